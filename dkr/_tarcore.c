/*
 * dkr._tarcore: the extractor's fast path for the member most layers are
 * made of, a plain regular file, created as root.
 *
 * Python's per-member work (parsing the header, a dozen calls around five
 * system calls) cost about as much as btrfs's own work for a small file, on
 * the thread each layer waits for. This creates runs of such files in one
 * call and drops the GIL around each file's system calls, so the inflating
 * thread runs meanwhile.
 *
 * It only ever takes the easy case and hands everything else back to
 * dkr.tarstream / dkr.extract, which stay the definition of what a member
 * means: anything unusual (another type, pax or GNU extensions, a number not
 * in plain octal, a checksum that does not add up, a path needing
 * normalising, a whiteout, a name already taken or a missing parent, a body
 * not wholly in the buffer) stops the run *before* that member, untouched,
 * and Python applies it as if this module did not exist.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512

/* A plain octal field: `digits` digits 0-7, then a NUL or a space. */
static int
plain_octal(const unsigned char *field, int digits, unsigned long long *out)
{
    unsigned long long value = 0;
    for (int i = 0; i < digits; i++) {
        if (field[i] < '0' || field[i] > '7')
            return 0;
        value = value * 8 + (field[i] - '0');
    }
    if (field[digits] != 0 && field[digits] != ' ')
        return 0;
    *out = value;
    return 1;
}

typedef struct {
    unsigned int mode, uid, gid;
    unsigned long long size;
    long long mtime;
    char path[256 + 1 + 100 + 1];
    size_t path_len;
} PlainFile;

/* The unsigned byte sum, the checksum field counted as eight spaces. */
static int
checksum_ok(const unsigned char *h, unsigned long long stored)
{
    unsigned long sum = 8 * ' ';
    for (int i = 0; i < 148; i++)
        sum += h[i];
    for (int i = 156; i < BLOCK; i++)
        sum += h[i];
    return sum == stored;
}

/* No empty, "." or ".." component and no leading or trailing "/": the path
 * is its own normal form (dkr.extract.normalize would return it unchanged). */
static int
already_normal(const char *p, size_t n)
{
    size_t start = 0;
    if (n == 0)
        return 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || p[i] == '/') {
            size_t len = i - start;
            if (len == 0 || (len == 1 && p[start] == '.') ||
                (len == 2 && p[start] == '.' && p[start + 1] == '.'))
                return 0;
            start = i + 1;
        }
    }
    return 1;
}

/* Fill `f` from the header at `h` if it is a plain regular file; else 0. */
static int
parse_plain(const unsigned char *h, PlainFile *f)
{
    unsigned long long mode, uid, gid, size, mtime, stored;
    char type = h[156];
    if (type != '0' && type != 0 && type != '7')
        return 0;
    if (!plain_octal(h + 100, 7, &mode) || !plain_octal(h + 108, 7, &uid) ||
        !plain_octal(h + 116, 7, &gid) || !plain_octal(h + 124, 11, &size) ||
        !plain_octal(h + 136, 11, &mtime) || !plain_octal(h + 148, 6, &stored) ||
        (h[155] != 0 && h[155] != ' '))
        return 0;
    if (!checksum_ok(h, stored))
        return 0;
    size_t name_len = strnlen((const char *)h, 100);
    size_t prefix_len = 0;
    if (memcmp(h + 257, "ustar\0", 6) == 0)
        prefix_len = strnlen((const char *)h + 345, 155);
    f->path_len = 0;
    if (prefix_len) {
        memcpy(f->path, h + 345, prefix_len);
        f->path[prefix_len] = '/';
        f->path_len = prefix_len + 1;
    }
    memcpy(f->path + f->path_len, h, name_len);
    f->path_len += name_len;
    f->path[f->path_len] = 0;
    if (!already_normal(f->path, f->path_len))
        return 0;
    f->mode = (unsigned int)(mode & 07777);
    f->uid = (unsigned int)uid;
    f->gid = (unsigned int)gid;
    f->size = size;
    f->mtime = (long long)mtime;
    return 1;
}

/* Write, own, stamp and close a new file; the GIL is not held.
 * Returns 0, or an errno with the file closed. */
static int
fill_file(int fd, const PlainFile *f, const char *body)
{
    unsigned long long left = f->size;
    while (left) {
        ssize_t n = write(fd, body, left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            goto fail;
        }
        body += n;
        left -= (unsigned long long)n;
    }
    struct stat st;
    if (fstat(fd, &st) < 0)
        goto fail;
    /* A set-group-ID directory hands its group down; a chown clears set-ID bits. */
    if (st.st_uid != f->uid || st.st_gid != f->gid) {
        if (fchown(fd, f->uid, f->gid) < 0 || fchmod(fd, f->mode) < 0)
            goto fail;
    } else if ((st.st_mode & 07777) != f->mode && fchmod(fd, f->mode) < 0) {
        goto fail;
    }
    struct timespec times[2] = {{f->mtime, 0}, {f->mtime, 0}};
    if (futimens(fd, times) < 0)
        goto fail;
    return close(fd) < 0 ? errno : 0;
fail:;
    int saved = errno;
    close(fd);
    return saved;
}

/* classify(path) is None: not a whiteout. -1 on a Python error. */
static int
not_a_whiteout(PyObject *classify, const PlainFile *f)
{
    PyObject *text = PyUnicode_DecodeUTF8(f->path, (Py_ssize_t)f->path_len, "surrogateescape");
    if (text == NULL)
        return -1;
    PyObject *verdict = PyObject_CallOneArg(classify, text);
    Py_DECREF(text);
    if (verdict == NULL)
        return -1;
    int plain = verdict == Py_None;
    Py_DECREF(verdict);
    return plain;
}

PyDoc_STRVAR(create_plain_files_doc,
"create_plain_files(buffer, pos, classify, added) -> (pos, created)\n\n"
"Create the plain regular files whose headers and bodies follow one another\n"
"in ``buffer`` from ``pos``, relative to the current directory, as root:\n"
"mode, owner and mtime from the header; each path goes into the set\n"
"``added``. Stops before the first member it does not take, which is left\n"
"for the caller, and returns where that is and how many files it made.\n"
"A failing write, chown, chmod or utime raises OSError.");

static PyObject *
create_plain_files(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    PyObject *classify, *added;
    if (!PyArg_ParseTuple(args, "y*nOO!", &view, &pos, &classify, &PySet_Type, &added))
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t created = 0;
    PlainFile f;
    while (pos >= 0 && view.len - pos >= BLOCK && parse_plain(buf + pos, &f)) {
        unsigned long long padded = (f.size + BLOCK - 1) / BLOCK * BLOCK;
        if (padded > (unsigned long long)(view.len - pos - BLOCK))
            break;                                  /* the body is not all here yet */
        int plain = not_a_whiteout(classify, &f);
        if (plain < 0)
            goto error;
        if (!plain)
            break;
        int fd, err;
        Py_BEGIN_ALLOW_THREADS
        fd = open(f.path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, f.mode);
        err = fd < 0 ? 0 : fill_file(fd, &f, (const char *)buf + pos + BLOCK);
        Py_END_ALLOW_THREADS
        if (fd < 0)
            break;              /* taken, or no parent: dkr.extract clears the way */
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto error;
        }
        PyObject *path = PyBytes_FromStringAndSize(f.path, (Py_ssize_t)f.path_len);
        if (path == NULL || PySet_Add(added, path) < 0) {
            Py_XDECREF(path);
            goto error;
        }
        Py_DECREF(path);
        pos += BLOCK + (Py_ssize_t)padded;
        created++;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nn", pos, created);
error:
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"create_plain_files", create_plain_files, METH_VARARGS, create_plain_files_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dkr._tarcore",
    "The extractor's fast path for plain regular files (see dkr.extract).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tarcore(void)
{
    return PyModule_Create(&module);
}
