/* FNV-1a 64-bit, byte for byte the hash ggml-rpc uses to name its tensor cache files
 * (fnv_hash in ggml/src/ggml-rpc/ggml-rpc.cpp). Compiled lazily by inference/rpc_cache.py:
 *     cc -O3 -shared -fPIC fnv1a.c -o fnv1a.so
 * `seed` chains calls over chunks: start with 0xcbf29ce484222325 (the FNV-1a offset basis). */
#include <stddef.h>
#include <stdint.h>

uint64_t fnv1a64(const uint8_t *data, size_t len, uint64_t seed) {
    const uint64_t prime = 0x100000001b3ULL;
    uint64_t hash = seed;
    for (size_t i = 0; i < len; ++i) {
        hash ^= data[i];
        hash *= prime;
    }
    return hash;
}
