/* One-pass parser for the common case of a delimited file: label, dense and categorical
 * columns, no quotes, '\n' line ends. It turns a block of whole lines into model-ready
 * columns (labels, log1p'd dense floats, categorical cells hashed to int64 exactly as
 * `unified_embedding.hashing.hash_bytes` does) without the GIL, so blocks parse in parallel.
 *
 * It only ever accepts: a label "0" or "1", dense cells that are empty or -?[0-9]{1,18},
 * and the file's exact column count. Anything else in a block (a bad row, a decimal dense
 * value, a '\r', a quote when quoting is on) makes it return None, and the caller reads
 * that block with the careful pyarrow reader, which words errors with file, line and column
 * and applies --on-bad-rows. So this file decides nothing about bad input; it only
 * recognises input that is certainly good.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "../splitmix64.h"

enum { SKIP = 0, LABEL = 1, DENSE = 2, CATEGORICAL = 3 };

/* hash_bytes of one cell: the length mixed in first, then each zero-padded little-endian
 * 8-byte word folded in turn. */
#define SHORT_CELL 64
static uint64_t initial_state[SHORT_CELL]; /* mix64(length + SPLITMIX_GOLDEN) of short lengths, computed once */

static inline int64_t hash_cell(const unsigned char *cell, size_t length, const unsigned char *end) {
    uint64_t state = length < SHORT_CELL ? initial_state[length] : mix64((uint64_t)length + SPLITMIX_GOLDEN);
    if (length <= 8 && end - cell >= 8) { /* the common short cell: one load, the bytes past it masked off */
        uint64_t word;
        memcpy(&word, cell, 8);
        if (length < 8) word &= (1ULL << (8 * length)) - 1;
        return (int64_t)(length ? mix64(state ^ word) : state);
    }
    while (length > 0) {
        uint64_t word = 0;
        size_t take = length < 8 ? length : 8;
        memcpy(&word, cell, take); /* little-endian hosts only; checked at import */
        state = mix64(state ^ word);
        cell += take;
        length -= take;
    }
    return (int64_t)state;
}

/* log1p of the small counts that dominate dense columns, computed once: the same libm call,
 * so the same floats, without its cost per cell. */
#define LOG1P_TABLE_SIZE 65536
static float log1p_table[LOG1P_TABLE_SIZE];

static inline float dense_value(int64_t value, int negative, int take_log) {
    if (negative) return -(float)(double)value; /* negatives have no log and stay as they are */
    if (!take_log) return (float)(double)value;
    if (value < LOG1P_TABLE_SIZE) return log1p_table[value];
    return (float)log1p((double)value);
}

/* The value of `length` decimal digits at `digits` (0 for none); 0 when a byte is not a digit
 * or there are more than 18. Up to eight digits are checked and converted together in one
 * word, without a branch per digit (cells are short and their lengths unpredictable). */
static inline int parse_digits(const unsigned char *digits, size_t length, const unsigned char *end, int64_t *value) {
    if (length == 0) {
        *value = 0;
        return 1;
    }
    if (length <= 8 && end - digits >= 8) {
        uint64_t word;
        memcpy(&word, digits, 8);
        /* the digits to the top bytes, '0's before them: leading zeros keep the value */
        unsigned shift = 8 * (unsigned)(8 - length);
        word = shift ? (word << shift) | (0x3030303030303030ULL >> (64 - shift)) : word;
        if (((word & 0xF0F0F0F0F0F0F0F0ULL) | (((word + 0x0606060606060606ULL) & 0xF0F0F0F0F0F0F0F0ULL) >> 4)) !=
            0x3333333333333333ULL)
            return 0;
        word -= 0x3030303030303030ULL;
        word = (word * 10) + (word >> 8);
        word = (((word & 0x000000FF000000FFULL) * (100 + (1000000ULL << 32))) +
                (((word >> 16) & 0x000000FF000000FFULL) * (1 + (10000ULL << 32)))) >>
               32;
        *value = (int64_t)word;
        return 1;
    }
    if (length > 18) return 0;
    int64_t number = 0;
    for (size_t i = 0; i < length; i++) {
        if (digits[i] < '0' || digits[i] > '9') return 0;
        number = number * 10 + (digits[i] - '0');
    }
    *value = number;
    return 1;
}

/* Lines in [p, end): newlines, plus an unterminated last line. */
static Py_ssize_t count_lines(const unsigned char *p, const unsigned char *end) {
    Py_ssize_t lines = 0;
    const unsigned char *start = p;
    while (p < end) {
        const unsigned char *newline = memchr(p, '\n', (size_t)(end - p));
        if (newline == NULL) break;
        lines++;
        p = newline + 1;
    }
    if (end > start && end[-1] != '\n') lines++;
    return lines;
}

typedef struct {
    const unsigned char *begin, *end;
    unsigned char delimiter;
    int quoting, log1p;
    Py_ssize_t num_columns, num_dense, rows;
    const signed char *kinds;
    const int32_t *targets;
    float *labels, *dense;
    int64_t *categorical;
} Block;

/* 1 when every line of the block was certainly good and is written out, 0 otherwise. */
/* Stores one cell's value; 0 when the cell is not certainly good. */
static inline int take_cell(Block *b, Py_ssize_t row, Py_ssize_t column, const unsigned char *cell, size_t length) {
    int32_t target = b->targets[column];
    switch (b->kinds[column]) {
    case LABEL:
        if (length != 1 || (cell[0] != '0' && cell[0] != '1')) return 0;
        b->labels[row] = (float)(cell[0] - '0');
        return 1;
    case DENSE: {
        int negative = length > 0 && cell[0] == '-';
        int64_t value;
        if ((negative && length == 1) || !parse_digits(cell + negative, length - (size_t)negative, b->end, &value))
            return 0;
        /* counts span orders of magnitude: log1p tames them */
        b->dense[row * b->num_dense + target] = dense_value(value, negative && value != 0, b->log1p);
        return 1;
    }
    case CATEGORICAL:
        b->categorical[(Py_ssize_t)target * b->rows + row] = hash_cell(cell, length, b->end);
        return 1;
    default:
        return 1;
    }
}

/* Bit i set where p[i] is the delimiter or '\n', for the (up to) 64 bytes from p. Building the
 * whole mask first and walking its bits leaves no unpredictable branch per byte or per cell. */
static inline uint64_t separators(const unsigned char *p, const unsigned char *end, unsigned char delimiter) {
    uint64_t mask = 0;
#ifdef __SSE2__
    if (end - p >= 64) {
        const __m128i tab = _mm_set1_epi8((char)delimiter), newline = _mm_set1_epi8('\n');
        for (int i = 0; i < 4; i++) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(p + 16 * i));
            __m128i hits = _mm_or_si128(_mm_cmpeq_epi8(bytes, tab), _mm_cmpeq_epi8(bytes, newline));
            mask |= (uint64_t)(uint16_t)_mm_movemask_epi8(hits) << (16 * i);
        }
        return mask;
    }
#endif
    Py_ssize_t n = end - p < 64 ? end - p : 64;
    for (Py_ssize_t i = 0; i < n; i++) mask |= (uint64_t)(p[i] == delimiter || p[i] == '\n') << i;
    return mask;
}

/* 1 when every line of the block was certainly good and is written out, 0 otherwise. */
static int parse_block(Block *b) {
    const unsigned char *begin = b->begin, *end = b->end;
    /* '\r' (a line end to pyarrow) and quotes are rare: refuse the whole block up front, so
     * the scan looks for two bytes, not four. */
    if (memchr(begin, '\r', (size_t)(end - begin)) || (b->quoting && memchr(begin, '"', (size_t)(end - begin))))
        return 0;
    Py_ssize_t row = 0, column = 0;
    const unsigned char *cell = begin;
    for (const unsigned char *window = begin; window < end; window += 64) {
        for (uint64_t mask = separators(window, end, b->delimiter); mask; mask &= mask - 1) {
            const unsigned char *stop = window + __builtin_ctzll(mask);
            if (row >= b->rows || column >= b->num_columns) return 0;
            if (!take_cell(b, row, column, cell, (size_t)(stop - cell))) return 0;
            column++;
            if (*stop == '\n') {
                if (column != b->num_columns) return 0;
                row++;
                column = 0;
            }
            cell = stop + 1;
        }
    }
    if (cell < end || column > 0) { /* a last line without its '\n' */
        if (row >= b->rows || column >= b->num_columns || !take_cell(b, row, column, cell, (size_t)(end - cell)))
            return 0;
        if (++column != b->num_columns) return 0;
        row++;
    }
    return row == b->rows;
}

static PyObject *parse(PyObject *self, PyObject *args) {
    Py_buffer data, kinds, targets;
    Py_ssize_t start, stop, num_dense, num_categorical;
    int delimiter, quoting, log1p_dense;
    if (!PyArg_ParseTuple(args, "y*nnCy*y*nnpp", &data, &start, &stop, &delimiter, &kinds, &targets, &num_dense,
                          &num_categorical, &log1p_dense, &quoting))
        return NULL;
    PyObject *result = NULL, *labels = NULL, *dense = NULL, *categorical = NULL;
    if (start < 0 || stop > data.len || start > stop || targets.len != kinds.len * (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_ValueError, "parse: bad block bounds or column plan");
        goto done;
    }
    Block b = {
        .begin = (const unsigned char *)data.buf + start,
        .end = (const unsigned char *)data.buf + stop,
        .delimiter = (unsigned char)delimiter,
        .quoting = quoting,
        .log1p = log1p_dense,
        .num_columns = kinds.len,
        .num_dense = num_dense,
        .kinds = (const signed char *)kinds.buf,
        .targets = (const int32_t *)targets.buf,
    };
    Py_BEGIN_ALLOW_THREADS b.rows = count_lines(b.begin, b.end);
    Py_END_ALLOW_THREADS

    labels = PyByteArray_FromStringAndSize(NULL, b.rows * (Py_ssize_t)sizeof(float));
    dense = PyByteArray_FromStringAndSize(NULL, b.rows * num_dense * (Py_ssize_t)sizeof(float));
    categorical = PyByteArray_FromStringAndSize(NULL, b.rows * num_categorical * (Py_ssize_t)sizeof(int64_t));
    if (labels == NULL || dense == NULL || categorical == NULL) goto done;
    b.labels = (float *)PyByteArray_AS_STRING(labels);
    b.dense = (float *)PyByteArray_AS_STRING(dense);
    b.categorical = (int64_t *)PyByteArray_AS_STRING(categorical);
    memset(b.dense, 0, (size_t)(b.rows * num_dense) * sizeof(float)); /* an empty dense cell is 0 */

    int good;
    Py_BEGIN_ALLOW_THREADS good = parse_block(&b);
    Py_END_ALLOW_THREADS

    if (good) {
        result = Py_BuildValue("(nOOO)", b.rows, labels, dense, categorical);
    } else {
        result = Py_NewRef(Py_None);
    }
done:
    Py_XDECREF(labels);
    Py_XDECREF(dense);
    Py_XDECREF(categorical);
    PyBuffer_Release(&data);
    PyBuffer_Release(&kinds);
    PyBuffer_Release(&targets);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS,
     "parse(data, start, stop, delimiter, kinds, targets, num_dense, num_categorical, log1p, quoting)\n"
     "-> (rows, labels, dense, categorical) as bytearrays, or None when the block needs the careful reader."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcsv", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastcsv(void) {
    for (int i = 0; i < LOG1P_TABLE_SIZE; i++) log1p_table[i] = (float)log1p((double)i);
    for (int i = 0; i < SHORT_CELL; i++) initial_state[i] = mix64((uint64_t)i + SPLITMIX_GOLDEN);
    return PyModule_Create(&module);
}
