"""The CPU flag choice: pure functions over the feature lists real machines report."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.cpu import (
    _X86_NEEDS,
    X86_OPTIONS,
    CpuInfo,
    arm_march,
    cpu_variants,
    parse_cpuinfo,
    parse_sysctl,
)

# The flags line of the project's standard machine (Xeon, Sapphire Rapids class, in a KVM guest).
SAPPHIRE_RAPIDS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand "
    "hypervisor lahf_lm abm 3dnowprefetch cpuid_fault fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm "
    "avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec "
    "xgetbv1 xsaves avx_vnni avx512_bf16 arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni "
    "avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b fsrm serialize tsxldtrk amx_bf16 avx512_fp16 "
    "amx_tile amx_int8 arch_capabilities"
)
ZEN4 = (
    "fpu sse sse2 sse4_1 sse4_2 avx f16c fma bmi1 bmi2 avx2 avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl "
    "avx512_bf16 avx512vbmi avx512_vbmi2 gfni vaes avx512_vnni avx512_bitalg avx512_vpopcntdq"
)
HASWELL = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 bmi2 avx2 movbe popcnt"
ALDER_LAKE = HASWELL + " avx_vnni sha_ni"
SANDY_BRIDGE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx popcnt"
GRAVITON3 = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 "
    "sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng"
)
NEOVERSE_V2_SME = GRAVITON3 + " sve2 sme"
RASPBERRY_PI4 = "fp asimd evtstrm crc32 cpuid"


def x86(flags: str) -> CpuInfo:
    return CpuInfo("x86_64", "Linux", "test", frozenset(flags.split()))


def arm(flags: str, system: str = "Linux") -> CpuInfo:
    return CpuInfo("arm64", system, "test", frozenset(flags.split()))


def names(cpu: CpuInfo) -> list[str]:
    return [v.name for v in cpu_variants(cpu)]


def on(flags: tuple[str, ...]) -> set[str]:
    return {f.removeprefix("-DGGML_").removesuffix("=ON") for f in flags if f.endswith("=ON")}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (SAPPHIRE_RAPIDS, ["avx512-amx", "avx512", "avx2", "x86-64"]),
        (ZEN4, ["avx512", "avx2", "x86-64"]),
        (ALDER_LAKE, ["avx2-vnni", "avx2", "x86-64"]),
        (HASWELL, ["avx2", "x86-64"]),
        (SANDY_BRIDGE, ["avx", "x86-64"]),
        ("fpu sse sse2", ["x86-64"]),
        ("", ["x86-64"]),
    ],
)
def test_x86_variants_best_first_down_to_plain_x86_64(flags: str, expected: list[str]) -> None:
    assert names(x86(flags)) == expected


def test_sapphire_rapids_tries_amx_first_then_the_same_without_amx() -> None:
    amx, avx512, avx2, plain = cpu_variants(x86(SAPPHIRE_RAPIDS))
    assert {"AMX_TILE", "AMX_INT8", "AMX_BF16", "AVX512", "AVX512_VNNI", "AVX512_VBMI", "AVX512_BF16"} <= on(amx.flags)
    assert on(avx512.flags) == on(amx.flags) - {"AMX_TILE", "AMX_INT8", "AMX_BF16"}
    assert on(avx2.flags) == {"SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2"}
    assert on(plain.flags) == set()  # nothing on
    assert "pinned AMX" in amx.why and "no AMX" in avx512.why


def test_every_x86_variant_is_explicit_never_native() -> None:
    for variant in cpu_variants(x86(SAPPHIRE_RAPIDS)):
        assert "-DGGML_NATIVE=OFF" in variant.flags and "-DGGML_NATIVE=ON" not in variant.flags
        # every option named, so CMake defaults (GGML_NATIVE=OFF turns AVX/AVX2/FMA... on) decide nothing
        assert {f.split("=")[0].removeprefix("-DGGML_") for f in variant.flags} == {"NATIVE", *X86_OPTIONS}


def test_amx_without_avx512_vnni_is_not_used() -> None:
    """ggml compiles its AMX code only with AVX512-VNNI too: AMX alone would be a variant that is not AMX."""
    flags = SAPPHIRE_RAPIDS.replace(" avx512_vnni", "")
    assert names(x86(flags))[0] == "avx512"
    assert all("AMX_INT8" not in on(v.flags) for v in cpu_variants(x86(flags)))


def test_avx512_needs_all_five_subsets() -> None:
    """GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw: a CPU missing one (Knights Landing lacks vl/dq/bw) gets none."""
    knl = HASWELL + " avx512f avx512cd avx512er avx512pf"
    assert names(x86(knl)) == ["avx2", "x86-64"]


@given(st.sets(st.sampled_from(sorted({f for needs in _X86_NEEDS.values() for f in needs} | {"sse2", "ssse3"}))))
def test_no_x86_variant_uses_an_instruction_the_cpu_does_not_report(features: set[str]) -> None:
    variants = cpu_variants(x86(" ".join(features)))
    for v in variants:
        for option in on(v.flags):
            assert set(_X86_NEEDS[option]) <= features, (v.name, option)
    assert on(variants[-1].flags) == set()  # the last resort runs anywhere
    assert len({v.name for v in variants}) == len(variants)
    assert len({v.flags for v in variants}) == len(variants)


@pytest.mark.parametrize(
    ("flags", "system", "expected"),
    [
        (GRAVITON3, "Linux", ["arm-armv8.6-a-dotprod-fp16-sve-i8mm", "arm-armv8.2-a-dotprod", "arm-armv8-a"]),
        (
            NEOVERSE_V2_SME,
            "Linux",
            ["arm-armv8.6-a-dotprod-fp16-sve-i8mm-sve2", "arm-armv8.2-a-dotprod", "arm-armv8-a"],
        ),
        (RASPBERRY_PI4, "Linux", ["arm-armv8-a"]),
        ("asimddp asimdhp", "Darwin", ["arm-armv8.2-a-dotprod", "arm-armv8-a"]),  # Apple M1
        ("asimddp asimdhp i8mm bf16", "Darwin", ["arm-armv8.6-a-dotprod-i8mm", "arm-armv8.2-a-dotprod", "arm-armv8-a"]),
        ("asimddp asimdhp i8mm sme", "Darwin", ["arm-armv8.6-a-dotprod-i8mm", "arm-armv8.2-a-dotprod", "arm-armv8-a"]),
    ],
)
def test_arm_variants(flags: str, system: str, expected: list[str]) -> None:
    assert names(arm(flags, system)) == expected


def test_arm_leaves_sme_out_and_sets_the_march() -> None:
    assert arm_march(frozenset(NEOVERSE_V2_SME.split())) == "armv8.6-a+dotprod+fp16+sve+i8mm+sve2"
    first = cpu_variants(arm(NEOVERSE_V2_SME))[0]
    assert first.flags == ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.6-a+dotprod+fp16+sve+i8mm+sve2")
    assert "SME left out" in first.why


def test_other_architectures_try_native_then_generic() -> None:
    variants = cpu_variants(CpuInfo("ppc64le", "Linux", "POWER9", frozenset()))
    assert [v.flags for v in variants] == [("-DGGML_NATIVE=ON",), ("-DGGML_NATIVE=OFF",)]


def test_parse_cpuinfo_x86_and_arm() -> None:
    text = (
        f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: {HASWELL}\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    model, features = parse_cpuinfo(text)
    assert model == "Intel(R) Xeon(R) Processor" and "avx2" in features and "fpu" in features
    model, features = parse_cpuinfo(
        f"processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: {GRAVITON3}\nCPU part\t: 0xd40\n"
    )
    assert "asimddp" in features and "sve" in features and model == ""


def test_parse_sysctl_apple_silicon_and_intel_mac() -> None:
    apple = (
        "machdep.cpu.brand_string: Apple M2\nhw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 1\n"
        "hw.optional.arm.FEAT_FP16: 1\nhw.optional.arm.FEAT_SME: 0\nhw.optional.arm.FEAT_BF16: 1\n"
    )
    model, features = parse_sysctl(apple)
    assert model == "Apple M2" and features == {"asimddp", "i8mm", "asimdhp", "bf16"}
    intel = (
        "machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\n"
        "machdep.cpu.features: FPU VME SSE SSE2 SSE4.1 SSE4.2 AVX1.0 F16C FMA\n"
        "machdep.cpu.leaf7_features: BMI1 AVX2 BMI2\n"
    )
    model, features = parse_sysctl(intel)
    assert names(x86(" ".join(features))) == ["avx2", "x86-64"]
