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

/* 1: n bytes read; 0: the peer closed before the first byte; -1: error or a partial read */
static int read_all(int fd, uint8_t *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t k = recv(fd, p + got, n - got, 0);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k == 0) {
            return got == 0 ? 0 : -1;
        }
        if (k < 0) {
            return -1;
        }
        got += (size_t)k;
    }
    return 1;
}

static void end_both(const struct direction *d) {
    shutdown(d->local_fd, SHUT_RDWR);
    shutdown(d->net_fd, SHUT_RDWR);
}

static void *seal_loop(void *arg) {
    struct direction *d = arg;
    static __thread uint8_t plain[MAX_RECORD];
    static __thread uint8_t record[HEAD + MAX_RECORD + TAG];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    uint64_t n = 0;
    d->result = END_CRYPTO;
    if (ctx == NULL || EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1) {
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
        uint8_t iv[12];
        int len = 0, fin = 0;
        uint32_t size = (uint32_t)k;
        for (int i = 0; i < HEAD; i++) {
            record[i] = (uint8_t)(size >> (8 * i));
        }
        nonce_of(n++, iv);
        if (EVP_EncryptInit_ex(ctx, NULL, NULL, d->key, iv) != 1 ||
            EVP_EncryptUpdate(ctx, NULL, &len, record, HEAD) != 1 ||
            EVP_EncryptUpdate(ctx, record + HEAD, &len, plain, (int)size) != 1 ||
            EVP_EncryptFinal_ex(ctx, record + HEAD + len, &fin) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, record + HEAD + size) != 1) {
            d->result = END_CRYPTO;
            goto done;
        }
        if (write_all(d->to, record, HEAD + size + TAG) != 0) {
            d->result = END_IO;
            goto done;
        }
        __atomic_fetch_add(d->counter, (uint64_t)size, __ATOMIC_RELAXED);
    }
done:
    if (ctx != NULL) {
        EVP_CIPHER_CTX_free(ctx);
    }
    end_both(d);
    return NULL;
}

static void open_loop(struct direction *d) {
    static __thread uint8_t record[MAX_RECORD + TAG];
    static __thread uint8_t plain[MAX_RECORD];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    uint64_t n = 0;
    d->result = END_CRYPTO;
    if (ctx == NULL || EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1) {
        goto done;
    }
    for (;;) {
        uint8_t head[HEAD];
        int got = read_all(d->from, head, HEAD);
        if (got <= 0) {
            d->result = got == 0 ? END_CLOSED : END_IO;
            goto done;
        }
        uint32_t size = (uint32_t)head[0] | (uint32_t)head[1] << 8 | (uint32_t)head[2] << 16 | (uint32_t)head[3] << 24;
        if (size == 0 || size > MAX_RECORD) {
            d->result = END_AUTH;
            goto done;
        }
        if (read_all(d->from, record, size + TAG) != 1) {
            d->result = END_IO;
            goto done;
        }
        uint8_t iv[12];
        int len = 0, fin = 0;
        nonce_of(n++, iv);
        if (EVP_DecryptInit_ex(ctx, NULL, NULL, d->key, iv) != 1 ||
            EVP_DecryptUpdate(ctx, NULL, &len, head, HEAD) != 1 ||
            EVP_DecryptUpdate(ctx, plain, &len, record, (int)size) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, record + size) != 1 ||
            EVP_DecryptFinal_ex(ctx, plain + len, &fin) != 1) {
            d->result = END_AUTH; /* nothing of a forged record reaches the local side */
            goto done;
        }
        if (write_all(d->to, plain, size) != 0) {
            d->result = END_IO;
            goto done;
        }
        __atomic_fetch_add(d->counter, (uint64_t)size, __ATOMIC_RELAXED);
    }
done:
    if (ctx != NULL) {
        EVP_CIPHER_CTX_free(ctx);
    }
    end_both(d);
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
