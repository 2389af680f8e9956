/*
 * dkr.unpack._tarcore: the extractor's fast path for the member most layers are
 * made of, a plain regular file, created as root.
 *
 * Python's per-member work (parsing the header, a dozen calls around five
 * system calls) cost about as much as btrfs's own work for a small file, on
 * the thread each layer waits for. This creates runs of such files in one
 * call and drops the GIL around each file's system calls, so the inflating
 * thread runs meanwhile.
 *
 * It only ever takes the easy case and hands everything else back to
 * dkr.unpack.tarstream / dkr.unpack.extract, which stay the definition of what a member
 * means: anything unusual (another type, GNU extensions, pax records other
 * than a lone path, a number not in plain octal, a checksum that does not add
 * up, a path needing normalising, a whiteout, a name already taken or a
 * missing parent, a body not wholly in the buffer) stops the run *before*
 * that member, untouched, and Python applies it as if this module did not
 * exist.
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

/* A header whose numbers are all plain octal and whose checksum adds up. */
typedef struct {
    unsigned long long mode, uid, gid, size, mtime;
    char type;
} Header;

/* A pax header may give a path of up to this many bytes; longer ones take
 * the Python path. Its record adds "LENGTH path=" and a newline. */
#define MAX_PAX_PATH 4096
#define MAX_PAX_RECORD (MAX_PAX_PATH + 32)

typedef struct {
    unsigned int mode, uid, gid;
    unsigned long long size;
    long long mtime;
    char path[MAX_PAX_PATH + 1];
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

static int
plain_header(const unsigned char *h, Header *hd)
{
    unsigned long long stored;
    if (!plain_octal(h + 100, 7, &hd->mode) || !plain_octal(h + 108, 7, &hd->uid) ||
        !plain_octal(h + 116, 7, &hd->gid) || !plain_octal(h + 124, 11, &hd->size) ||
        !plain_octal(h + 136, 11, &hd->mtime) || !plain_octal(h + 148, 6, &stored) ||
        (h[155] != 0 && h[155] != ' '))
        return 0;
    hd->type = (char)h[156];
    return checksum_ok(h, stored);
}

/* No empty, "." or ".." component and no leading or trailing "/": the path
 * is its own normal form (dkr.unpack.extract.normalize would return it unchanged). */
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

/* A pax body that is exactly one record, "LENGTH path=VALUE\n", and nothing
 * else (what tar writers emit for a long name): copies VALUE into `f`. */
static int
pax_path_only(const unsigned char *body, unsigned long long size, PlainFile *f)
{
    static const char key[] = "path=";
    unsigned long long length = 0, i = 0;
    while (i < size && i < 20 && body[i] >= '0' && body[i] <= '9')
        length = length * 10 + (body[i++] - '0');
    if (i == 0 || i >= size || body[i] != ' ' || length != size || body[size - 1] != '\n')
        return 0;
    i++;
    if (size - i < sizeof key || memcmp(body + i, key, sizeof key - 1) != 0)
        return 0;
    i += sizeof key - 1;
    size_t len = (size_t)(size - 1 - i);
    if (len > MAX_PAX_PATH || memchr(body + i, 0, len) != NULL)
        return 0;
    memcpy(f->path, body + i, len);
    f->path[len] = 0;
    f->path_len = len;
    return 1;
}

/* The name a ustar (or older) header gives, into `f`. */
static void
header_path(const unsigned char *h, PlainFile *f)
{
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
}

static unsigned long long
padded(unsigned long long size)
{
    return (size + BLOCK - 1) / BLOCK * BLOCK;
}

/* If the member at `buf[pos]` (a pax header giving only its path, then a
 * regular file's header, or the file's header alone) is a plain regular file
 * whose body is in the buffer, fill `f` and return where its body starts;
 * else -1. */
static Py_ssize_t
parse_plain(const unsigned char *buf, Py_ssize_t len, Py_ssize_t pos, PlainFile *f)
{
    Header hd;
    int named_by_pax = 0;
    if (len - pos < BLOCK || !plain_header(buf + pos, &hd))
        return -1;
    if (hd.type == 'x') {
        if (hd.size > MAX_PAX_RECORD ||
            (unsigned long long)(len - pos) < BLOCK + padded(hd.size) + BLOCK ||
            !pax_path_only(buf + pos + BLOCK, hd.size, f))
            return -1;                              /* (the file's header must be here too) */
        pos += BLOCK + (Py_ssize_t)padded(hd.size);
        named_by_pax = 1;
        if (!plain_header(buf + pos, &hd))
            return -1;
    }
    /* Only these types have a body that is the file's bytes. Header-only
     * types (whose size field means nothing), GNU sparse files ('S', whose
     * body is packed data) and every extension header go to Python; so does
     * a regular-typed name ending in "/", a directory (already_normal). */
    if (hd.type != '0' && hd.type != 0 && hd.type != '7')
        return -1;
    if (!named_by_pax)
        header_path(buf + pos, f);
    if (!already_normal(f->path, f->path_len))
        return -1;
    if (padded(hd.size) > (unsigned long long)(len - pos - BLOCK))
        return -1;                                  /* the body is not all here yet */
    f->mode = (unsigned int)(hd.mode & 07777);
    f->uid = (unsigned int)hd.uid;
    f->gid = (unsigned int)hd.gid;
    f->size = hd.size;
    f->mtime = (long long)hd.mtime;
    return pos + BLOCK;
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

/* classify(path, mode, uid, gid, size) is None: not a whiteout (a resolver may
 * look at more than the name). -1 on a Python error. */
static int
not_a_whiteout(PyObject *classify, const PlainFile *f)
{
    PyObject *text = PyUnicode_DecodeUTF8(f->path, (Py_ssize_t)f->path_len, "surrogateescape");
    if (text == NULL)
        return -1;
    PyObject *verdict = PyObject_CallFunction(classify, "NIIIK", text, f->mode, f->uid, f->gid,
                                              f->size);
    if (verdict == NULL)
        return -1;
    int plain = verdict == Py_None;
    Py_DECREF(verdict);
    return plain;
}

PyDoc_STRVAR(create_plain_files_doc,
"create_plain_files(buffer, pos, classify, added) -> (pos, created)\n\n"
"``classify(path, mode, uid, gid, size)`` says whether a file is a whiteout.\n"
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
    Py_ssize_t body;
    while (pos >= 0 && (body = parse_plain(buf, view.len, pos, &f)) >= 0) {
        int plain = not_a_whiteout(classify, &f);
        if (plain < 0)
            goto error;
        if (!plain)
            break;
        int fd, err;
        Py_BEGIN_ALLOW_THREADS
        fd = open(f.path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, f.mode);
        err = fd < 0 ? 0 : fill_file(fd, &f, (const char *)buf + body);
        Py_END_ALLOW_THREADS
        if (fd < 0)
            break;              /* taken, or no parent: dkr.unpack.extract clears the way */
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
        pos = body + (Py_ssize_t)padded(f.size);
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
    PyModuleDef_HEAD_INIT, "dkr.unpack._tarcore",
    "The extractor's fast path for plain regular files (see dkr.unpack.extract).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tarcore(void)
{
    return PyModule_Create(&module);
}
