/* The proxy's innermost loops in C: the scan of a pipeline's run of one command (scan_run) and the
 * encoding of a MARK frame (mark_frame).
 *
 * Each has a reference in typed Python that runs when this module was not built: framing.scan_run
 * and marks.encode_marks. On the proxy's input (bytes, lists of bytes, offsets within the buffer)
 * they must return exactly what the references do; tests/proxy/test_resp_c.py compares them. Where
 * the references would go on quietly, bad arguments here raise instead of reading outside a buffer.
 * Why C: compiled Python reads each byte of a request through a bounds-checked index, four times
 * per command; here it is one pass over a char pointer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <string.h>

/* The canonical decimal at i ended by CRLF (no sign, no leading zero, at most 9 digits): its value,
 * *next set after the CRLF; -1 otherwise. */
static inline Py_ssize_t count_at(const char *b, Py_ssize_t i, Py_ssize_t n, Py_ssize_t *next)
{
    Py_ssize_t start = i, value = 0;
    while (i < n) {
        unsigned char c = (unsigned char)b[i];
        if (c == '\r') {
            if (i == start || i + 1 >= n || b[i + 1] != '\n' || (b[start] == '0' && i - start > 1))
                return -1;
            *next = i + 2;
            return value;
        }
        if (c < '0' || c > '9' || i - start >= 9)
            return -1;
        value = value * 10 + (c - '0');
        i++;
    }
    return -1;
}

/* The bulk string whose '$' is at i, whole in the buffer: the start of its payload, *end its end;
 * -1 otherwise. */
static inline Py_ssize_t bulk_at(const char *b, Py_ssize_t i, Py_ssize_t n, Py_ssize_t *end)
{
    Py_ssize_t start = 0, size, e;
    if (i >= n || b[i] != '$')
        return -1;
    size = count_at(b, i + 1, n, &start);
    if (size < 0)
        return -1;
    if (size > n - start - 2)       /* written so that it cannot overflow */
        return -1;
    e = start + size;
    if (b[e] != '\r' || b[e + 1] != '\n')
        return -1;
    *end = e;
    return start;
}

/* An int argument; -1 with an exception set when it is none (or does not fit). */
static Py_ssize_t arg_ssize(PyObject *o)
{
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "scan_run: offsets must be ints");
        return -1;
    }
    return PyLong_AsSsize_t(o);
}

PyDoc_STRVAR(scan_run_doc,
"scan_run(data, pos, name_start, name_end, key_at, keys) -> (end, count)\n\n"
"From pos, the plain complete commands named data[name_start:name_end]: how many, and where the\n"
"last ends. The argument at index key_at (the name is 0; 0 for none) of each is appended to keys.");

static PyObject *scan_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyBytes_CheckExact(args[0]) || !PyList_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "scan_run(data: bytes, pos, name_start, name_end, key_at, keys: list)");
        return NULL;
    }
    const char *b = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t offsets[4];
    for (int i = 0; i < 4; i++) {
        offsets[i] = arg_ssize(args[1 + i]);
        if (offsets[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t pos = offsets[0], name_start = offsets[1], name_end = offsets[2], key_at = offsets[3];
    PyObject *keys = args[5];
    if (pos < 0 || pos > n || name_start < 0 || name_end < name_start || name_end > n || key_at < 0) {
        PyErr_SetString(PyExc_ValueError, "scan_run: offsets outside data");
        return NULL;
    }
    const char *name = b + name_start;
    Py_ssize_t name_len = name_end - name_start, count = 0;
    while (pos < n) {
        Py_ssize_t i = 0, e = 0, s, argc, index, key_start = -1, key_end = -1;
        if (b[pos] != '*')
            break;
        argc = count_at(b, pos + 1, n, &i);
        if (argc < 1)
            break;
        s = bulk_at(b, i, n, &e);
        if (s < 0 || e - s != name_len || memcmp(b + s, name, (size_t)name_len) != 0)
            break;
        i = e + 2;
        for (index = 1; index < argc; index++) {
            s = bulk_at(b, i, n, &e);
            if (s < 0)
                break;
            if (index == key_at) {
                key_start = s;
                key_end = e;
            }
            i = e + 2;
        }
        if (index < argc)
            break;
        if (key_start >= 0) {
            PyObject *key = PyBytes_FromStringAndSize(b + key_start, key_end - key_start);
            if (key == NULL)
                return NULL;
            int failed = PyList_Append(keys, key);
            Py_DECREF(key);
            if (failed)
                return NULL;
        }
        count++;
        pos = i;
    }
    PyObject *end = PyLong_FromSsize_t(pos), *scanned = PyLong_FromSsize_t(count);
    if (end == NULL || scanned == NULL) {
        Py_XDECREF(end);
        Py_XDECREF(scanned);
        return NULL;
    }
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(end);
        Py_DECREF(scanned);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, end);
    PyTuple_SET_ITEM(result, 1, scanned);
    return result;
}

/* How many decimal digits a size has. */
static Py_ssize_t digits_of(Py_ssize_t v)
{
    Py_ssize_t digits = 1;
    for (; v >= 10; v /= 10)
        digits++;
    return digits;
}

/* "$<size>\r\n" at p; returns the end. */
static char *put_bulk_header(char *p, Py_ssize_t size, Py_ssize_t digits)
{
    *p = '$';
    for (Py_ssize_t i = digits; i > 0; i--, size /= 10)
        p[i] = (char)('0' + size % 10);
    p += digits + 1;
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

PyDoc_STRVAR(mark_frame_doc,
"mark_frame(db, keys) -> bytes\n\n"
"MARK <db> <mark>... in RESP (marks.encode_marks is the reference); keys: a list of bytes, where an\n"
"instance of a bytes subclass (members.MemberMark) goes as the array [key, its .member].");

/* The member of a MemberMark (a new reference, checked to be bytes); NULL with an exception set. */
static PyObject *member_of(PyObject *mark)
{
    PyObject *member = PyObject_GetAttrString(mark, "member");
    if (member != NULL && !PyBytes_Check(member)) {
        Py_DECREF(member);
        PyErr_SetString(PyExc_TypeError, "mark_frame: a member must be bytes");
        return NULL;
    }
    return member;
}

static PyObject *mark_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyLong_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "mark_frame(db: int, keys: list[bytes])");
        return NULL;
    }
    long long db = PyLong_AsLongLong(args[0]);
    if (db == -1 && PyErr_Occurred())
        return NULL;
    PyObject *keys = args[1];
    Py_ssize_t count = PyList_GET_SIZE(keys), i;
    char dbs[24], head[96];
    int dblen = snprintf(dbs, sizeof(dbs), "%lld", db);
    int headlen = snprintf(head, sizeof(head), "*%zd\r\n$4\r\nMARK\r\n$%d\r\n%s\r\n", count + 2, dblen, dbs);
    /* The size first (a "$<n>\r\n" header, the key and CRLF per key; "*2\r\n" and the member's bulk
     * string more for a member mark), then one buffer filled in place. */
    Py_ssize_t size = headlen;
    for (i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyBytes_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "mark_frame: keys must be bytes");
            return NULL;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(key);
        if (n > PY_SSIZE_T_MAX / 2 - size - 32)     /* "$", up to 20 digits, CRLF, the key, CRLF */
            return PyErr_NoMemory();
        size += 1 + digits_of(n) + 2 + n + 2;
        if (!PyBytes_CheckExact(key)) {
            PyObject *member = member_of(key);
            if (member == NULL)
                return NULL;
            Py_ssize_t m = PyBytes_GET_SIZE(member);
            Py_DECREF(member);      /* the mark holds it: its size stays what it is here */
            if (m > PY_SSIZE_T_MAX / 2 - size - 32)
                return PyErr_NoMemory();
            size += 4 + 1 + digits_of(m) + 2 + m + 2;
        }
    }
    PyObject *frame = PyBytes_FromStringAndSize(NULL, size);
    if (frame == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(frame);
    memcpy(p, head, (size_t)headlen);
    p += headlen;
    for (i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *member = NULL;
        if (!PyBytes_CheckExact(key)) {
            member = member_of(key);
            if (member == NULL) {
                Py_DECREF(frame);
                return NULL;
            }
            memcpy(p, "*2\r\n", 4);
            p += 4;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(key);
        p = put_bulk_header(p, n, digits_of(n));
        memcpy(p, PyBytes_AS_STRING(key), (size_t)n);
        p += n;
        *p++ = '\r';
        *p++ = '\n';
        if (member != NULL) {
            Py_ssize_t m = PyBytes_GET_SIZE(member);
            if (PyBytes_AS_STRING(frame) + size - p < 1 + digits_of(m) + 2 + m + 2) {
                /* the member was replaced since the frame was sized */
                Py_DECREF(member);
                Py_DECREF(frame);
                PyErr_SetString(PyExc_RuntimeError, "mark_frame: a member changed while framing");
                return NULL;
            }
            p = put_bulk_header(p, m, digits_of(m));
            memcpy(p, PyBytes_AS_STRING(member), (size_t)m);
            p += m;
            *p++ = '\r';
            *p++ = '\n';
            Py_DECREF(member);
        }
    }
    return frame;
}

static PyMethodDef methods[] = {
    {"scan_run", (PyCFunction)(void (*)(void))scan_run, METH_FASTCALL, scan_run_doc},
    {"mark_frame", (PyCFunction)(void (*)(void))mark_frame, METH_FASTCALL, mark_frame_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resp", "The proxy's innermost loops in C (references: framing.scan_run, "
    "marks.encode_marks).", -1, methods,
};

PyMODINIT_FUNC PyInit__resp(void)
{
    return PyModule_Create(&module);
}
