/* mesh-llm: the data plane's splice in C (mesh_mcp/dataplane/native.py says when and why).
 *
 * After the TLS handshake and the mesh handshake, both ends of a tunnel derive two AES-256-GCM keys (one per
 * direction) from random bytes they exchanged inside TLS, and the bytes of llama.cpp RPC cross as records:
 *
 *     | u32 little-endian plaintext length L (1..MAX_RECORD) | ciphertext (L bytes) | GCM tag (16 bytes) |
 *
 * The length is the additional authenticated data; the 96-bit nonce is 4 zero bytes and a 64-bit little-endian
 * record counter, per direction, from 0. A record that fails authentication, a length out of range, or any socket
 * error ends the tunnel: both sockets are shut down, so the other direction's thread wakes and both return.
 *
 * Up to BATCH records go out in one write (what one read of the local side gave), and every whole record a read of
 * the network brought is opened before the plaintext goes out in one write.
 *
 * One call, mesh_native_splice(), runs both directions: a second thread encrypts local -> net while the calling
 * thread decrypts net -> local (Python calls it through ctypes, which releases the GIL for the whole splice).
 * counters[0] counts plaintext bytes local -> net, counters[1] net -> local (relaxed atomics; read live).
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <openssl/evp.h>

#define MAX_RECORD 16384
#define TAG 16
#define HEAD 4
#define BATCH 4 /* records per write, and per read when they are there */

enum { END_CLOSED = 0, END_IO = 1, END_AUTH = 2, END_CRYPTO = 3 };

struct direction {
    int from, to;
    const uint8_t *key;
    uint64_t *counter;
    int result;
    int local_fd, net_fd;
};

static void nonce_of(uint64_t n, uint8_t iv[12]) {
    memset(iv, 0, 4);
    for (int i = 0; i < 8; i++) {
        iv[4 + i] = (uint8_t)(n >> (8 * i));
    }
}

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k <= 0) {
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void end_both(const struct direction *d) {
    shutdown(d->local_fd, SHUT_RDWR);
    shutdown(d->net_fd, SHUT_RDWR);
}

/* write n bytes on, counting `counted` of them once written; 0 or -1 (the direction then ends as END_IO) */
static int deliver(struct direction *d, const uint8_t *p, size_t n, uint32_t counted) {
    if (write_all(d->to, p, n) != 0) {
        d->result = END_IO;
        return -1;
    }
    __atomic_fetch_add(d->counter, (uint64_t)counted, __ATOMIC_RELAXED);
    return 0;
}

/* a direction's end: free its cipher, wake the other direction */
static void finish(struct direction *d, EVP_CIPHER_CTX *ctx) {
    if (ctx != NULL) {
        EVP_CIPHER_CTX_free(ctx);
    }
    end_both(d);
}

/* an AES-256-GCM context with 12-byte IVs, sealing (enc 1) or opening (enc 0); keys and IVs come per record.
   NULL when OpenSSL fails */
static EVP_CIPHER_CTX *gcm_new(int enc) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx != NULL && (EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL, enc) != 1 ||
                        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1)) {
        EVP_CIPHER_CTX_free(ctx);
        ctx = NULL;
    }
    return ctx;
}

static void *seal_loop(void *arg) {
    struct direction *d = arg;
    static __thread uint8_t plain[BATCH * MAX_RECORD];
    static __thread uint8_t out[BATCH * (HEAD + MAX_RECORD + TAG)];
    EVP_CIPHER_CTX *ctx = gcm_new(1);
    uint64_t n = 0;
    d->result = END_CRYPTO;
    if (ctx == NULL) {
        goto done;
    }
    for (;;) {
        ssize_t k = recv(d->from, plain, sizeof(plain), 0);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k <= 0) {
            d->result = k == 0 ? END_CLOSED : END_IO;
            goto done;
        }
        size_t o = 0; /* what was read, as up to BATCH records, written at once */
        for (size_t at = 0; at < (size_t)k;) {
            uint32_t size = (size_t)k - at > MAX_RECORD ? MAX_RECORD : (uint32_t)((size_t)k - at);
            uint8_t *record = out + o, iv[12];
            int len = 0, fin = 0;
            for (int i = 0; i < HEAD; i++) {
                record[i] = (uint8_t)(size >> (8 * i));
            }
            nonce_of(n++, iv);
            if (EVP_EncryptInit_ex(ctx, NULL, NULL, d->key, iv) != 1 ||
                EVP_EncryptUpdate(ctx, NULL, &len, record, HEAD) != 1 ||
                EVP_EncryptUpdate(ctx, record + HEAD, &len, plain + at, (int)size) != 1 ||
                EVP_EncryptFinal_ex(ctx, record + HEAD + len, &fin) != 1 ||
                EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, record + HEAD + size) != 1) {
                d->result = END_CRYPTO;
                goto done;
            }
            o += HEAD + size + TAG;
            at += size;
        }
        if (deliver(d, out, o, (uint32_t)k) != 0) {
            goto done;
        }
    }
done:
    finish(d, ctx);
    return NULL;
}

static void open_loop(struct direction *d) {
    static __thread uint8_t in[BATCH * (HEAD + MAX_RECORD + TAG)];
    static __thread uint8_t plain[BATCH * MAX_RECORD];
    size_t off = 0, have = 0; /* in[off, have): received, not yet opened */
    EVP_CIPHER_CTX *ctx = gcm_new(0);
    uint64_t n = 0;
    d->result = END_CRYPTO;
    if (ctx == NULL) {
        goto done;
    }
    for (;;) {
        size_t po = 0; /* open every whole record received (up to BATCH), then write them at once */
        while (have - off >= HEAD) {
            const uint8_t *head = in + off;
            uint32_t size = (uint32_t)head[0] | (uint32_t)head[1] << 8 | (uint32_t)head[2] << 16 |
                            (uint32_t)head[3] << 24;
            if (size == 0 || size > MAX_RECORD) {
                d->result = END_AUTH;
                goto done;
            }
            if (have - off < HEAD + size + TAG || po + size > sizeof(plain)) {
                break;
            }
            uint8_t iv[12];
            int len = 0, fin = 0;
            nonce_of(n++, iv);
            if (EVP_DecryptInit_ex(ctx, NULL, NULL, d->key, iv) != 1 ||
                EVP_DecryptUpdate(ctx, NULL, &len, head, HEAD) != 1 ||
                EVP_DecryptUpdate(ctx, plain + po, &len, head + HEAD, (int)size) != 1 ||
                EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, (void *)(head + HEAD + size)) != 1 ||
                EVP_DecryptFinal_ex(ctx, plain + po + len, &fin) != 1) {
                d->result = END_AUTH; /* nothing of a forged record, or after it, reaches the local side */
                goto done;
            }
            po += size;
            off += HEAD + size + TAG;
        }
        if (po > 0) {
            if (deliver(d, plain, po, (uint32_t)po) != 0) {
                goto done;
            }
            continue;
        }
        if (off > 0) { /* keep the partial record at the front */
            memmove(in, in + off, have - off);
            have -= off;
            off = 0;
        }
        ssize_t k = recv(d->from, in + have, sizeof(in) - have, 0);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k <= 0) {
            d->result = k == 0 && have == 0 ? END_CLOSED : END_IO;
            goto done;
        }
        have += (size_t)k;
    }
done:
    finish(d, ctx);
}

/* Returns the worse of the two directions' ends: 0 closed, 1 socket error, 2 a record failed authentication,
 * 3 the cipher could not be set up. */
int mesh_native_splice(int local_fd, int net_fd, const uint8_t *key_send, const uint8_t *key_recv,
                       uint64_t *counters) {
    struct direction out = {local_fd, net_fd, key_send, &counters[0], 0, local_fd, net_fd};
    struct direction in = {net_fd, local_fd, key_recv, &counters[1], 0, local_fd, net_fd};
    pthread_t thread;
    if (pthread_create(&thread, NULL, seal_loop, &out) != 0) {
        end_both(&out);
        return END_IO;
    }
    open_loop(&in);
    pthread_join(thread, NULL);
    int worst = out.result > in.result ? out.result : in.result;
    return worst;
}
