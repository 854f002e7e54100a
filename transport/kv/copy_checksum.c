/* A checked copy in one pass: copy a buffer to its destinations and compute the xxh3-64 digest
 * (seed 0, default secret) of each span of it, reading every source byte from memory once.
 *
 * Copying with numpy and then hashing with xxhash reads each span twice; on the KV plane's
 * same-host path both sides do that for every byte, which costs the transfer ~17% of its time at
 * 512 tokens (bench/kv_handoff.py's shape, an A/B with hashing skipped on both sides).
 *
 * Written from the XXH3 specification (xxHash's doc/xxhash_spec.md): the digests are exactly
 * xxhash.xxh3_64_intdigest's, which the tests check for every length up to a few blocks and for
 * large random ones, so either side may verify with either implementation. Little-endian hosts
 * with 128-bit integers only (the import fails elsewhere and Python's two-pass copy is used).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if !defined(__SIZEOF_INT128__)
#error "a 64x64->128-bit multiply is needed"
#endif

#define STRIPE 64
#define SECRET_SIZE 192
#define STRIPES_PER_BLOCK ((SECRET_SIZE - STRIPE) / 8)
#define BLOCK (STRIPE * STRIPES_PER_BLOCK)
#define MIDSIZE_MAX 240

static const uint8_t SECRET[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

#define P32_1 0x9E3779B1ULL
#define P32_2 0x85EBCA77ULL
#define P32_3 0xC2B2AE3DULL
#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define P64_4 0x85EBCA77C2B2AE63ULL
#define P64_5 0x27D4EB2F165667C5ULL
#define MX1 0x165667919E3779F9ULL
#define MX2 0x9FB21C651E98DF25ULL

static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rotl64(uint64_t v, int r) { return (v << r) | (v >> (64 - r)); }

static inline uint64_t fold128(uint64_t a, uint64_t b) {
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

static inline uint64_t avalanche(uint64_t h) {
    h ^= h >> 37;
    h *= MX1;
    return h ^ (h >> 32);
}

static inline uint64_t avalanche_xxh64(uint64_t h) {
    h ^= h >> 33;
    h *= P64_2;
    h ^= h >> 29;
    h *= P64_3;
    return h ^ (h >> 32);
}

static inline uint64_t mix16(const uint8_t *in, const uint8_t *secret) {
    return fold128(rd64(in) ^ rd64(secret), rd64(in + 8) ^ rd64(secret + 8));
}

/* Inputs of at most 240 bytes (hashed only: their copy is a plain memcpy). */
static uint64_t hash_short(const uint8_t *in, size_t len) {
    if (len > 16) {
        uint64_t acc = len * P64_1;
        if (len <= 128) {
            for (ptrdiff_t i = (ptrdiff_t)((len - 1) >> 5); i >= 0; i--) {
                acc += mix16(in + 16 * i, SECRET + 32 * i);
                acc += mix16(in + len - 16 * i - 16, SECRET + 32 * i + 16);
            }
            return avalanche(acc);
        }
        size_t chunks = len >> 4;
        for (size_t i = 0; i < 8; i++) acc += mix16(in + 16 * i, SECRET + 16 * i);
        acc = avalanche(acc);
        for (size_t i = 8; i < chunks; i++) acc += mix16(in + 16 * i, SECRET + 16 * (i - 8) + 3);
        acc += mix16(in + len - 16, SECRET + 119);
        return avalanche(acc);
    }
    if (len > 8) {
        uint64_t lo = rd64(SECRET + 24) ^ rd64(SECRET + 32) ^ rd64(in);
        uint64_t hi = rd64(SECRET + 40) ^ rd64(SECRET + 48) ^ rd64(in + len - 8);
        return avalanche(len + __builtin_bswap64(lo) + hi + fold128(lo, hi));
    }
    if (len >= 4) {
        uint64_t v = rd64(SECRET + 8) ^ rd64(SECRET + 16) ^ ((uint64_t)rd32(in + len - 4) | ((uint64_t)rd32(in) << 32));
        v ^= rotl64(v, 49) ^ rotl64(v, 24);
        v *= MX2;
        v ^= (v >> 35) + len;
        v *= MX2;
        return v ^ (v >> 28);
    }
    if (len > 0) {
        uint32_t combined = (uint32_t)in[len - 1] | ((uint32_t)len << 8) | ((uint32_t)in[0] << 16) |
                            ((uint32_t)in[len >> 1] << 24);
        return avalanche_xxh64((uint64_t)(rd32(SECRET) ^ rd32(SECRET + 4)) ^ combined);
    }
    return avalanche_xxh64(rd64(SECRET + 56) ^ rd64(SECRET + 64));
}

/* The long-input accumulators: eight 64-bit lanes. */
#if defined(__SSE2__)
typedef struct { __m128i v[4]; } Acc;

static inline void acc_init(Acc *a) {
    a->v[0] = _mm_set_epi64x((long long)P64_1, (long long)P32_3);
    a->v[1] = _mm_set_epi64x((long long)P64_3, (long long)P64_2);
    a->v[2] = _mm_set_epi64x((long long)P32_2, (long long)P64_4);
    a->v[3] = _mm_set_epi64x((long long)P32_1, (long long)P64_5);
}

static inline void acc_stripe(Acc *a, const uint8_t *in, const uint8_t *secret) {
    for (int j = 0; j < 4; j++) {
        __m128i data = _mm_loadu_si128((const __m128i *)(in + 16 * j));
        __m128i key = _mm_xor_si128(data, _mm_loadu_si128((const __m128i *)(secret + 16 * j)));
        /* (low 32 bits) x (high 32 bits) of each keyed lane, plus the neighbouring lane's data. */
        __m128i product = _mm_mul_epu32(key, _mm_shuffle_epi32(key, _MM_SHUFFLE(0, 3, 0, 1)));
        __m128i swapped = _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        a->v[j] = _mm_add_epi64(a->v[j], _mm_add_epi64(product, swapped));
    }
}

static inline void acc_scramble(Acc *a, const uint8_t *secret) {
    const __m128i prime = _mm_set1_epi32((int)P32_1);
    for (int j = 0; j < 4; j++) {
        __m128i v = a->v[j];
        v = _mm_xor_si128(v, _mm_srli_epi64(v, 47));
        v = _mm_xor_si128(v, _mm_loadu_si128((const __m128i *)(secret + 16 * j)));
        /* A 64-bit lane times a 32-bit prime, from two 32x32->64 multiplies. */
        __m128i low = _mm_mul_epu32(v, prime);
        __m128i high = _mm_mul_epu32(_mm_shuffle_epi32(v, _MM_SHUFFLE(0, 3, 0, 1)), prime);
        a->v[j] = _mm_add_epi64(low, _mm_slli_epi64(high, 32));
    }
}

static inline void acc_out(const Acc *a, uint64_t out[8]) {
    for (int j = 0; j < 4; j++) _mm_storeu_si128((__m128i *)(out + 2 * j), a->v[j]);
}
#else
typedef struct { uint64_t v[8]; } Acc;

static inline void acc_init(Acc *a) {
    const uint64_t init[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
    memcpy(a->v, init, sizeof init);
}

static inline void acc_stripe(Acc *a, const uint8_t *in, const uint8_t *secret) {
    for (int i = 0; i < 8; i++) {
        uint64_t data = rd64(in + 8 * i);
        uint64_t key = data ^ rd64(secret + 8 * i);
        a->v[i ^ 1] += data;
        a->v[i] += (key & 0xFFFFFFFFULL) * (key >> 32);
    }
}

static inline void acc_scramble(Acc *a, const uint8_t *secret) {
    for (int i = 0; i < 8; i++) {
        uint64_t v = a->v[i];
        v ^= v >> 47;
        v ^= rd64(secret + 8 * i);
        a->v[i] = v * P32_1;
    }
}

static inline void acc_out(const Acc *a, uint64_t out[8]) { memcpy(out, a->v, 8 * sizeof(uint64_t)); }
#endif

/* Where copied bytes go: pieces in order, each a pointer (NULL: those bytes are not kept) and a
 * length. The caller makes the pieces' lengths add up to the source's. */
typedef struct {
    char *const *ptr;
    const Py_ssize_t *len;
    Py_ssize_t index;
    char *at;
    Py_ssize_t left;
} Dest;

static void put(Dest *d, const uint8_t *src, Py_ssize_t n) {
    while (n > 0) {
        while (d->left == 0) {
            d->index++;
            d->at = d->ptr[d->index];
            d->left = d->len[d->index];
        }
        Py_ssize_t m = n < d->left ? n : d->left;
        if (d->at != NULL) {
            memcpy(d->at, src, (size_t)m);
            d->at += m;
        }
        d->left -= m;
        src += m;
        n -= m;
    }
}

static inline void put_stripe(Dest *d, const uint8_t *src) {
    if (d->left >= STRIPE && d->at != NULL) {
        memcpy(d->at, src, STRIPE);
        d->at += STRIPE;
        d->left -= STRIPE;
    } else {
        put(d, src, STRIPE);
    }
}

/* Copy ``len`` (> 240) bytes of ``in`` to ``d`` and return their digest: every stripe is stored
 * and accumulated while it is in the core's first-level cache. */
static uint64_t copy_hash_long(const uint8_t *in, size_t len, Dest *d) {
    Acc acc;
    acc_init(&acc);
    size_t blocks = (len - 1) / BLOCK;
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t *block = in + b * BLOCK;
        for (size_t s = 0; s < STRIPES_PER_BLOCK; s++) {
            put_stripe(d, block + s * STRIPE);
            acc_stripe(&acc, block + s * STRIPE, SECRET + s * 8);
        }
        acc_scramble(&acc, SECRET + SECRET_SIZE - STRIPE);
    }
    const uint8_t *last = in + blocks * BLOCK;
    size_t stripes = (len - 1 - blocks * BLOCK) / STRIPE;
    for (size_t s = 0; s < stripes; s++) {
        put_stripe(d, last + s * STRIPE);
        acc_stripe(&acc, last + s * STRIPE, SECRET + s * 8);
    }
    size_t done = blocks * BLOCK + stripes * STRIPE;
    put(d, in + done, (Py_ssize_t)(len - done));
    acc_stripe(&acc, in + len - STRIPE, SECRET + SECRET_SIZE - STRIPE - 7);

    uint64_t lanes[8];
    acc_out(&acc, lanes);
    uint64_t result = len * P64_1;
    for (int i = 0; i < 4; i++)
        result += fold128(lanes[2 * i] ^ rd64(SECRET + 11 + 16 * i), lanes[2 * i + 1] ^ rd64(SECRET + 19 + 16 * i));
    return avalanche(result);
}

static void copy_spans(const uint8_t *src, Py_ssize_t len, Py_ssize_t span, Dest *d, uint64_t *out) {
    for (Py_ssize_t off = 0, k = 0; off < len; off += span, k++) {
        size_t n = (size_t)(len - off < span ? len - off : span);
        if (n > MIDSIZE_MAX) {
            out[k] = copy_hash_long(src + off, n, d);
        } else {
            out[k] = hash_short(src + off, n);
            put(d, src + off, (Py_ssize_t)n);
        }
    }
}

PyDoc_STRVAR(copy_checksums_doc,
             "copy_checksums(src, dsts, span_bytes) -> list[int]\n\n"
             "Copy the bytes of the C-contiguous buffer ``src`` into ``dsts`` in order (writable "
             "C-contiguous buffers; an int: that many bytes are not kept, their lengths adding up "
             "to ``src``'s) and return the xxh3-64 digest of each span of ``span_bytes`` bytes of "
             "``src`` (the last may be shorter), in one pass, without the GIL.");

static PyObject *copy_checksums(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dsts_obj;
    Py_ssize_t span;
    if (!PyArg_ParseTuple(args, "OOn:copy_checksums", &src_obj, &dsts_obj, &span)) return NULL;
    if (span <= 0) {
        PyErr_SetString(PyExc_ValueError, "span_bytes must be positive");
        return NULL;
    }
    Py_buffer src;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *seq = PySequence_Fast(dsts_obj, "dsts must be a sequence");
    if (seq == NULL) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_ssize_t pieces = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t spans = (src.len + span - 1) / span;
    Py_buffer *views = PyMem_Calloc((size_t)pieces + 1, sizeof(Py_buffer));
    char **ptr = PyMem_Calloc((size_t)pieces + 1, sizeof(char *));
    Py_ssize_t *lens = PyMem_Calloc((size_t)pieces + 1, sizeof(Py_ssize_t));
    uint64_t *digests = PyMem_Calloc((size_t)spans + 1, sizeof(uint64_t));
    PyObject *result = NULL;
    Py_ssize_t held = 0, total = 0;
    if (views == NULL || ptr == NULL || lens == NULL || digests == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < pieces; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (PyLong_Check(item)) {
            lens[i] = PyLong_AsSsize_t(item);
            if (lens[i] < 0) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a skipped piece must be >= 0 bytes");
                goto done;
            }
        } else {
            if (PyObject_GetBuffer(item, &views[held], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
            ptr[i] = views[held].buf;
            lens[i] = views[held].len;
            held++;
        }
        total += lens[i];
    }
    if (total != src.len) {
        PyErr_Format(PyExc_ValueError, "the destinations hold %zd bytes, the source has %zd", total, src.len);
        goto done;
    }
    Dest d = {ptr, lens, 0, ptr[0], lens[0]};
    Py_BEGIN_ALLOW_THREADS
    copy_spans((const uint8_t *)src.buf, src.len, span, &d, digests);
    Py_END_ALLOW_THREADS
    result = PyList_New(spans);
    for (Py_ssize_t k = 0; result != NULL && k < spans; k++) {
        PyObject *digest = PyLong_FromUnsignedLongLong(digests[k]);
        if (digest == NULL) Py_CLEAR(result);
        else PyList_SET_ITEM(result, k, digest);
    }
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(ptr);
    PyMem_Free(lens);
    PyMem_Free(digests);
    Py_DECREF(seq);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"copy_checksums", copy_checksums, METH_VARARGS, copy_checksums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_copy_checksum", NULL, -1, methods};

PyMODINIT_FUNC PyInit__copy_checksum(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "the checked copy kernel is for little-endian hosts");
        return NULL;
    }
    return PyModule_Create(&module);
}
