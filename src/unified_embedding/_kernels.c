/* Hot loops that torch runs as many passes (or as a slow serial draw), each in one pass.
 *
 * 1. Hashing: `unified_embedding.hashing`'s `salted_keys` and `keys_to_rows`. In torch each
 *    SplitMix64 round is several full passes over the ids (shift, mask, xor, multiply),
 *    about twenty for a lookup's row; a batch of 106k lookups spent 2.9 ms there, more than
 *    the gather of the rows. Settings (salts, row counts) come per element or per run of
 *    `repeat` elements, as the layer lays them out: ids slot-major [slots, batch], settings
 *    per slot. The torch functions give the same bits (tests).
 * 2. The fused optimizer step of `unified_embedding.fused.RowOptimizer`: each touched table
 *    row and its state row are read and written once, with the arithmetic in between, where
 *    torch needs an index_add_, an index_select and elementwise passes per state tensor.
 *    The torch path stays the fallback (and the float64 path); the tests hold both to the
 *    torch optimizers.
 * 3. Dropout masks for `unified_embedding.models.dropout`: one SplitMix64 draw per element
 *    (about 2 ns), where torch's CPU dropout draws each from one Mersenne Twister stream (14-16 ns).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "splitmix64.h"

typedef enum { SALTED_KEYS, KEYS_TO_ROWS } HashPass;

/* One pass over int64 words with a setting per run of `repeat` of them:
 *   SALTED_KEYS:  out[i] = mix64(values[i] ^ salts[i / repeat])
 *   KEYS_TO_ROWS: out[i] = (mix64(keys[i] + GOLDEN) >> 1) % sizes[i / repeat], sizes positive. */
static PyObject *hash_pass(PyObject *args, HashPass pass, const char *name) {
    Py_buffer values, settings, out;
    Py_ssize_t repeat;
    if (!PyArg_ParseTuple(args, "y*y*nw*", &values, &settings, &repeat, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = values.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t entries = settings.len / (Py_ssize_t)sizeof(int64_t);
    const uint64_t *v = values.buf, *s = settings.buf;
    uint64_t *o = out.buf;
    if (out.len != values.len) {
        PyErr_Format(PyExc_ValueError, "%s: out must be as long as the input", name);
        goto done;
    }
    if (repeat < 1 || entries * repeat != count) {
        PyErr_Format(PyExc_ValueError, "%s: %zd settings do not cover %zd elements in runs of %zd", name, entries,
                     count, repeat);
        goto done;
    }
    for (Py_ssize_t r = 0; pass == KEYS_TO_ROWS && r < entries; r++) {
        if ((int64_t)s[r] <= 0) {
            PyErr_Format(PyExc_ValueError, "%s: row counts must be positive, got %lld", name, (long long)s[r]);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t start = 0; start < count; start += repeat) {
        const uint64_t setting = s[start / repeat];
        if (pass == SALTED_KEYS) {
            for (Py_ssize_t i = start; i < start + repeat; i++) o[i] = mix64(v[i] ^ setting);
        } else {
            for (Py_ssize_t i = start; i < start + repeat; i++) o[i] = (mix64(v[i] + SPLITMIX_GOLDEN) >> 1) % setting;
        }
    }
    Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&settings);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *salted_keys(PyObject *self, PyObject *args) { return hash_pass(args, SALTED_KEYS, "salted_keys"); }

static PyObject *keys_to_rows(PyObject *self, PyObject *args) { return hash_pass(args, KEYS_TO_ROWS, "keys_to_rows"); }

enum { SGD = 0, ADAGRAD = 1, ROWWISE_ADAGRAD = 2, ADAM = 3 };

typedef struct {
    float lr, eps, rate1, rate2, weight_decay, step_size; /* rate = 1 - beta, rounded once from double */
} Hyper;

/* One touched row: `g` is its summed gradient (overwritten), `t` its table row, `a` and `b`
 * its state (Adagrad's sum, or Adam's moments; one word for row-wise Adagrad), `decay` the
 * L2 coefficient for the steps since the row was last touched. The operations and their
 * order are those of the torch path in fused.py. */
static inline void update_row(int kind, float *t, float *a, float *b, float *g, Py_ssize_t dim, float decay,
                              const Hyper *h) {
    if (decay != 0.0f)
        for (Py_ssize_t j = 0; j < dim; j++) g[j] += t[j] * decay;
    switch (kind) {
    case SGD:
        for (Py_ssize_t j = 0; j < dim; j++) t[j] += g[j] * -h->lr;
        break;
    case ADAGRAD:
        for (Py_ssize_t j = 0; j < dim; j++) {
            a[j] += g[j] * g[j];
            t[j] += g[j] / (sqrtf(a[j]) + h->eps) * -h->lr;
        }
        break;
    case ROWWISE_ADAGRAD: {
        float squares = 0.0f;
        for (Py_ssize_t j = 0; j < dim; j++) squares += g[j] * g[j];
        a[0] += squares / (float)dim;
        float denominator = sqrtf(a[0]) + h->eps;
        for (Py_ssize_t j = 0; j < dim; j++) t[j] += g[j] / denominator * -h->lr;
        break;
    }
    case ADAM:
        for (Py_ssize_t j = 0; j < dim; j++) {
            b[j] += (g[j] * g[j] - b[j]) * h->rate2;
            a[j] += (g[j] - a[j]) * h->rate1;
            t[j] += a[j] / (sqrtf(b[j]) + h->eps) * -h->step_size;
        }
        break;
    }
}

/* Touched rows are random in tables of GBs: every row is a cache (and often TLB) miss, and
 * one row's arithmetic is long enough that the CPU will not reach the next row's loads on
 * its own. Asking for rows this far ahead keeps that many misses in flight. */
#define PREFETCH_AHEAD 8

static inline void prefetch_row(const float *row, Py_ssize_t width) {
    for (Py_ssize_t j = 0; j < width; j += 16) __builtin_prefetch(row + j, 1, 0); /* 16 floats: a 64-byte line */
}

/* row_update(kind, table, dim, rows, grads, state_a, state_b, last_step, step, lr, eps, 1 - beta1, 1 - beta2,
 *            weight_decay, step_size, begin, end): step number `step` for unique rows[begin:end] (threads
 *            split the rows). With weight decay, last_step[row] (int64, one per table row) is the step
 *            that last touched the row: its L2 counts every step since, and becomes `step`. */
static PyObject *row_update(PyObject *self, PyObject *args) {
    int kind;
    Py_buffer table, rows, grads, state_a, state_b, last_step;
    Py_ssize_t dim, begin, end;
    long long step;
    Hyper h;
    if (!PyArg_ParseTuple(args, "iw*ny*w*w*w*w*Lffffffnn", &kind, &table, &dim, &rows, &grads, &state_a, &state_b,
                          &last_step, &step, &h.lr, &h.eps, &h.rate1, &h.rate2, &h.weight_decay, &h.step_size, &begin,
                          &end))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t table_rows = dim > 0 ? table.len / (Py_ssize_t)sizeof(float) / dim : 0;
    Py_ssize_t count = rows.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t state_width = kind == ROWWISE_ADAGRAD ? 1 : dim;
    int needs_a = kind != SGD, needs_b = kind == ADAM;
    if (kind < SGD || kind > ADAM || dim <= 0 || grads.len != count * dim * (Py_ssize_t)sizeof(float) || begin < 0 ||
        end > count || begin > end ||
        (needs_a && state_a.len != table_rows * state_width * (Py_ssize_t)sizeof(float)) ||
        (needs_b && state_b.len != table.len) ||
        (h.weight_decay != 0.0f && last_step.len != table_rows * (Py_ssize_t)sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "row_update: shapes of table, rows, gradients and state do not agree");
        goto done;
    }
    const int64_t *r = rows.buf;
    for (Py_ssize_t i = begin; i < end; i++) {
        if (r[i] < 0 || r[i] >= table_rows) {
            PyErr_Format(PyExc_IndexError, "row_update: row %lld outside the table's %zd rows", (long long)r[i],
                         table_rows);
            goto done;
        }
    }
    float *t = table.buf, *g = grads.buf, *a = state_a.buf, *b = state_b.buf;
    int64_t *last = last_step.buf;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = begin; i < end; i++) {
        if (i + PREFETCH_AHEAD < end) { /* rows are scattered over GBs: start their reads early */
            Py_ssize_t ahead = (Py_ssize_t)r[i + PREFETCH_AHEAD];
            prefetch_row(t + ahead * dim, dim);
            if (needs_a) prefetch_row(a + ahead * state_width, state_width);
            if (needs_b) prefetch_row(b + ahead * dim, dim);
            if (h.weight_decay != 0.0f) __builtin_prefetch(last + ahead, 1, 0);
        }
        Py_ssize_t row = (Py_ssize_t)r[i];
        float decay = 0.0f;
        if (h.weight_decay != 0.0f) {
            decay = (float)(step - last[row]) * h.weight_decay;
            last[row] = step;
        }
        update_row(kind, t + row * dim, needs_a ? a + row * state_width : NULL, needs_b ? b + row * dim : NULL,
                   g + i * dim, dim, decay, &h);
    }
    Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&grads);
    PyBuffer_Release(&state_a);
    PyBuffer_Release(&state_b);
    PyBuffer_Release(&last_step);
    return result;
}

/* out[i] = scale if the top 53 bits of the i-th output of a SplitMix64 generator seeded with
 * `seed` are >= threshold, else 0: a dropout mask keeping each element with probability
 * 1 - threshold / 2^53. float32 buffer. */
static PyObject *dropout_mask(PyObject *self, PyObject *args) {
    long long seed, threshold;
    float scale;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "LLfw*", &seed, &threshold, &scale, &out)) return NULL;
    const Py_ssize_t count = out.len / (Py_ssize_t)sizeof(float);
    const uint64_t keep_from = (uint64_t)threshold;
    uint64_t state = (uint64_t)seed;
    uint32_t scale_bits;
    memcpy(&scale_bits, &scale, sizeof scale_bits);
    uint32_t *o = out.buf; /* written as bits: a branch on a random keep would mispredict a third of the time */
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < count; i++) {
        state += SPLITMIX_GOLDEN;
        o[i] = scale_bits & (0u - (uint32_t)((mix64(state) >> 11) >= keep_from));
    }
    Py_END_ALLOW_THREADS PyBuffer_Release(&out);
    return Py_NewRef(Py_None);
}

static PyMethodDef methods[] = {
    {"salted_keys", salted_keys, METH_VARARGS, "out[i] = mix64(values[i] ^ salts[i // repeat]), int64 buffers"},
    {"keys_to_rows", keys_to_rows, METH_VARARGS,
     "out[i] = (mix64(keys[i] + GOLDEN) >> 1) % sizes[i // repeat], int64 buffers"},
    {"row_update", row_update, METH_VARARGS,
     "the fused optimizer step (0 sgd, 1 adagrad, 2 rowwise_adagrad, 3 adam) for unique rows[begin:end]"},
    {"dropout_mask", dropout_mask, METH_VARARGS,
     "out[i] = scale if (splitmix64 output i of seed) >> 11 >= threshold else 0, a float32 buffer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
