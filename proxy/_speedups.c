/*
 * proxy._speedups: the per-command hot path of respmeter in C.
 *
 * Three pieces, all with no I/O and no asyncio, each an exact drop-in for pure-Python code in
 * proxy/resp.py and proxy/metrics.py (which stay the reference and the fallback; tests run both and
 * compare them):
 *
 *   scan(buf, start, max_bulk, names, fast) -> (items, end, need, count)
 *       Frames client requests that are strict RESP multibulks of bulk strings, starting at a request
 *       boundary. Runs of consecutive "plain" commands (names[...] known, and, when key patterns are
 *       tracked, a pattern known without Python) come back as one item; everything else as its
 *       arguments. It never decides an error: at anything unusual (inline commands, empty or
 *       malformed multibulks, limits) it stops and the exact Python parser takes over from there.
 *
 *   ReplyFramer: the RESP2/RESP3 reply framer of proxy.resp.ReplyFramer, state for state, plus
 *       `plain`: whether every frame of the last feed was an ordinary reply (no error, no push, no
 *       array that could be a pub/sub message), which lets the session pair a whole read at once.
 *
 *   Histogram(bounds): proxy.metrics.Histogram (counts, total, n), whose observe(seconds, n) runs for
 *       every reply paired on the pooled fast path.
 *
 * Nothing here runs Python code while it holds borrowed references (dict lookups use bytes keys).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <string.h>

#define MAX_INLINE (64 * 1024)  /* PROTO_INLINE_MAX_SIZE */
#define HEAD_MAX 64
#define MAX_COUNT (1024 * 1024) /* larger multibulks go to the Python parser */
#define MAX_PARTIAL (64 * 1024) /* a larger incomplete request is resumed by the Python parser */
#define NAME_MAX_LEN 32
#define SATURATED ((long long)1 << 60)

enum { KIND_NORMAL = 0, KIND_ERROR = 1, KIND_PUSH = 2, KIND_ARRAY = 3 };

static PyObject *ProtocolError = NULL; /* proxy.resp.ProtocolError, set by init() */
static PyObject *NoKey = NULL;         /* proxy.patterns.NOKEY, set by init() */

/* ------------------------------------------------------------------------------------------------ */
/* helpers */

static inline const char *find_crlf(const char *p, const char *end) {
    /* first "\r\n" in [p, end) */
    while (p < end) {
        const char *r = memchr(p, '\r', (size_t)(end - p));
        if (r == NULL || r + 1 >= end)
            return NULL;
        if (r[1] == '\n')
            return r;
        p = r + 1;
    }
    return NULL;
}

/* Redis's string2ll for lengths: ASCII digits, no sign, no leading zero. -1 if not that. */
static inline long long strict_len(const char *p, Py_ssize_t len, long long limit) {
    if (len <= 0 || len > 18)
        return -1;
    if (p[0] == '0')
        return len == 1 ? 0 : -1;
    long long v = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c < '0' || c > '9')
            return -1;
        v = v * 10 + (c - '0');
    }
    return v > limit ? -1 : v;
}

/* ------------------------------------------------------------------------------------------------ */
/* scan */

typedef struct {
    PyObject *items;
    PyObject *entry; /* the current run's entry (NULL: no run) */
    PyObject *pat;   /* its pattern (or Py_None) */
    Py_ssize_t count, start, end;
} RunState;

/* Strong references throughout: an allocation can run the garbage collector, and with it
 * finalizers, so nothing is held borrowed across one. */
static int flush_run(RunState *rs) {
    if (rs->entry == NULL)
        return 0;
    PyObject *t = Py_BuildValue("(OOnnn)", rs->entry, rs->pat, rs->count, rs->start, rs->end);
    Py_CLEAR(rs->entry);
    Py_CLEAR(rs->pat);
    if (t == NULL)
        return -1;
    int r = PyList_Append(rs->items, t);
    Py_DECREF(t);
    return r;
}

/* The arguments of the (already validated) request at [cs, ce). */
static PyObject *request_args(const char *b, Py_ssize_t cs, Py_ssize_t count) {
    PyObject *args = PyList_New(count);
    if (args == NULL)
        return NULL;
    const char *p = b + cs;
    p = strchr(p, '\n') + 1; /* validated: the header line ends with CRLF */
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *nl = strchr(p, '\r');
        long long blen = 0;
        for (const char *q = p + 1; q < nl; q++)
            blen = blen * 10 + (*q - '0');
        PyObject *a = PyBytes_FromStringAndSize(nl + 2, (Py_ssize_t)blen);
        if (a == NULL) {
            Py_DECREF(args);
            return NULL;
        }
        PyList_SET_ITEM(args, i, a);
        p = nl + 2 + blen + 2;
    }
    return args;
}

static PyObject *lookup_bytes(PyObject *dict, const char *p, Py_ssize_t len, int lower) {
    /* new reference to dict[bytes] (lower-cased first when asked), NULL if absent or on error */
    char tmp[NAME_MAX_LEN];
    if (lower) {
        if (len > NAME_MAX_LEN)
            return NULL;
        for (Py_ssize_t i = 0; i < len; i++) {
            char c = p[i];
            tmp[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
        p = tmp;
    }
    PyObject *key = PyBytes_FromStringAndSize(p, len);
    if (key == NULL)
        return NULL;
    PyObject *v = PyDict_GetItemWithError(dict, key);
    Py_XINCREF(v);
    Py_DECREF(key);
    return v;
}

/* The value looked up for the last argument seen in one position (a command's name, its first key),
 * kept while the next commands send the same bytes: a pipeline looks its names up once. */
typedef struct {
    const char *raw; /* NULL: nothing yet */
    Py_ssize_t len;
    PyObject *value; /* strong reference, or NULL: not in the dict */
} Memo;

/* dict[bytes] through the memo, as a reference the memo holds (NULL if absent); -1 on error. */
static int memo_get(Memo *m, PyObject *dict, const char *p, Py_ssize_t len, int lower, PyObject **out) {
    if (m->raw != NULL && len == m->len && memcmp(p, m->raw, (size_t)len) == 0) {
        *out = m->value;
        return 0;
    }
    PyObject *v = lookup_bytes(dict, p, len, lower);
    if (v == NULL && PyErr_Occurred())
        return -1;
    m->raw = p;
    m->len = len;
    Py_XSETREF(m->value, v);
    *out = v;
    return 0;
}

/*
 * scan(buf, start, max_bulk, names, fast) -> (items, end, need, count)
 *
 * buf: bytes; start: offset of a request boundary; names: dict lower-case command name -> (entry,
 * keyed) where keyed is True when the command's key pattern is its first argument's; fast: None (no
 * pattern tracking) or dict raw first argument -> pattern.
 *
 * items: in order, (entry, pattern, n, s, e) for a run of n plain commands in buf[s:e], and
 * (args, s, e) for any other command. end: where scanning stopped; need: 0 when it stopped at the end
 * of buf, the length buf[end:] must reach before the next try when the request there is incomplete,
 * and -1 when the request there is for the Python parser. count: commands framed.
 */
static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyBytes_Check(args[0]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "scan(buf: bytes, start, max_bulk, names: dict, fast)");
        return NULL;
    }
    PyObject *bufobj = args[0];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    long long max_bulk = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *names = args[3];
    PyObject *fast = args[4] == Py_None ? NULL : args[4];
    if (fast != NULL && !PyDict_Check(fast)) {
        PyErr_SetString(PyExc_TypeError, "fast must be a dict or None");
        return NULL;
    }
    const char *b = PyBytes_AS_STRING(bufobj);
    Py_ssize_t n = PyBytes_GET_SIZE(bufobj);
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "start out of range");
        return NULL;
    }

    RunState rs = {PyList_New(0), NULL, NULL, 0, 0, 0};
    if (rs.items == NULL)
        return NULL;
    Py_ssize_t pos = start, need = 0, framed = 0;
    Memo name_memo = {NULL, 0, NULL}, key_memo = {NULL, 0, NULL};

    while (pos < n) {
        Py_ssize_t cs = pos;
        if (b[pos] != '*') {
            need = -1; /* an inline command */
            break;
        }
        const char *nl = find_crlf(b + pos, b + n);
        if (nl == NULL) {
            need = (n - cs > MAX_INLINE) ? -1 : n - cs + 1;
            break;
        }
        long long count = strict_len(b + pos + 1, nl - (b + pos + 1), MAX_COUNT);
        if (count <= 0) { /* empty, negative, malformed or huge: the Python parser decides */
            need = -1;
            break;
        }
        Py_ssize_t p = (nl - b) + 2;
        const char *a0 = NULL, *a1 = NULL;
        Py_ssize_t a0len = 0, a1len = 0;
        int incomplete = 0, odd = 0;
        for (long long i = 0; i < count; i++) {
            if (p >= n) {
                incomplete = 1;
                need = n - cs + 1;
                break;
            }
            if (b[p] != '$') {
                odd = 1;
                break;
            }
            const char *hl = find_crlf(b + p, b + n);
            if (hl == NULL) {
                if (n - p > MAX_INLINE)
                    odd = 1;
                else {
                    incomplete = 1;
                    need = n - cs + 1;
                }
                break;
            }
            long long blen = strict_len(b + p + 1, hl - (b + p + 1), max_bulk);
            if (blen < 0) {
                odd = 1;
                break;
            }
            Py_ssize_t ds = (hl - b) + 2;
            Py_ssize_t de = ds + (Py_ssize_t)blen;
            if (de + 2 > n) {
                incomplete = 1;
                need = de + 2 - cs;
                break;
            }
            if (b[de] != '\r' || b[de + 1] != '\n') {
                odd = 1;
                break;
            }
            if (i == 0) {
                a0 = b + ds;
                a0len = (Py_ssize_t)blen;
            } else if (i == 1) {
                a1 = b + ds;
                a1len = (Py_ssize_t)blen;
            }
            p = de + 2;
        }
        if (odd) {
            need = -1;
            break;
        }
        if (incomplete) {
            if (n - cs > MAX_PARTIAL)
                need = -1; /* resumed incrementally by the Python parser, never rescanned */
            break;
        }
        Py_ssize_t ce = p;
        framed++;

        /* classify */
        PyObject *val;
        if (memo_get(&name_memo, names, a0, a0len, 1, &val) < 0)
            goto error;
        PyObject *entry = NULL, *pat = Py_None;
        if (val != NULL && PyTuple_Check(val) && PyTuple_GET_SIZE(val) == 2) {
            entry = PyTuple_GET_ITEM(val, 0);
            if (fast != NULL) {
                if (count == 1) {
                    pat = NoKey;
                } else if (PyTuple_GET_ITEM(val, 1) == Py_True) {
                    /* the fast dict maps a raw key to its pattern whatever the command */
                    if (memo_get(&key_memo, fast, a1, a1len, 0, &pat) < 0)
                        goto error;
                    if (pat == NULL)
                        entry = NULL; /* a new key: Python folds it (and caches the pattern) */
                } else {
                    entry = NULL; /* its pattern needs the arguments */
                }
            }
        }
        if (entry != NULL) {
            if (rs.entry == entry && rs.pat == pat) {
                rs.count++;
                rs.end = ce;
            } else {
                if (flush_run(&rs) < 0)
                    goto error;
                rs.entry = Py_NewRef(entry);
                rs.pat = Py_NewRef(pat);
                rs.count = 1;
                rs.start = cs;
                rs.end = ce;
            }
        } else {
            if (flush_run(&rs) < 0)
                goto error;
            PyObject *argl = request_args(b, cs, (Py_ssize_t)count);
            if (argl == NULL)
                goto error;
            PyObject *t = Py_BuildValue("(Nnn)", argl, cs, ce);
            if (t == NULL || PyList_Append(rs.items, t) < 0) {
                Py_XDECREF(t);
                goto error;
            }
            Py_DECREF(t);
        }
        pos = ce;
    }
    if (flush_run(&rs) < 0)
        goto error;
    Py_XDECREF(name_memo.value);
    Py_XDECREF(key_memo.value);
    return Py_BuildValue("(Nnnn)", rs.items, pos, need, framed);
error:
    Py_XDECREF(rs.entry);
    Py_XDECREF(rs.pat);
    Py_XDECREF(name_memo.value);
    Py_XDECREF(key_memo.value);
    Py_DECREF(rs.items);
    return NULL;
}

/* ------------------------------------------------------------------------------------------------ */
/* ReplyFramer */

typedef struct {
    PyObject_HEAD
    Py_ssize_t *stack; /* elements still expected, per open aggregate */
    char *attr;        /* whether each open aggregate is an attribute */
    Py_ssize_t depth, cap;
    Py_ssize_t skip;   /* payload bytes (with CRLF) of the current bulk still to pass */
    PyObject *partial; /* bytes of an incomplete header (or short head bulk), or NULL */
    int kind;
    Py_ssize_t idx;    /* completed elements of the top-level aggregate */
    PyObject *head;    /* NULL: None */
    PyObject *num;     /* NULL: None */
    int plain;
} Framer;

static int framer_push(Framer *f, Py_ssize_t count, char is_attr) {
    if (f->depth == f->cap) {
        Py_ssize_t cap = f->cap ? f->cap * 2 : 8;
        Py_ssize_t *s = PyMem_Realloc(f->stack, (size_t)cap * sizeof(Py_ssize_t));
        if (s == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        f->stack = s;
        char *a = PyMem_Realloc(f->attr, (size_t)cap);
        if (a == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        f->attr = a;
        f->cap = cap;
    }
    f->stack[f->depth] = count;
    f->attr[f->depth] = is_attr;
    f->depth++;
    return 0;
}

static const char *const PUBSUB_KINDS[] = {
    "message", "pmessage", "smessage", "subscribe", "psubscribe", "ssubscribe",
    "unsubscribe", "punsubscribe", "sunsubscribe", NULL,
};

static int is_pubsub_kind(PyObject *head) {
    const char *s = PyBytes_AS_STRING(head);
    Py_ssize_t len = PyBytes_GET_SIZE(head);
    for (int i = 0; PUBSUB_KINDS[i] != NULL; i++) {
        if ((Py_ssize_t)strlen(PUBSUB_KINDS[i]) == len && PyOS_strnicmp(s, PUBSUB_KINDS[i], len) == 0)
            return 1;
    }
    return 0;
}

/* An element (scalar or aggregate) just ended at `end`: walk up the open aggregates. */
static int element_done(Framer *f, PyObject *frames, Py_ssize_t end) {
    while (f->depth) {
        Py_ssize_t top = f->depth - 1;
        f->stack[top]--;
        if (f->depth == 1 && !f->attr[0])
            f->idx++;
        if (f->stack[top] > 0)
            return 0;
        f->depth--;
        if (f->attr[top])
            return 0; /* an attribute ends: it prefixes the next element, still to come */
    }
    if (f->kind == KIND_ERROR || f->kind == KIND_PUSH ||
        (f->kind == KIND_ARRAY && f->head != NULL && is_pubsub_kind(f->head)))
        f->plain = 0;
    PyObject *t = PyTuple_New(4);
    if (t == NULL)
        return -1;
    PyObject *e = PyLong_FromSsize_t(end);
    if (e == NULL) {
        Py_DECREF(t);
        return -1;
    }
    PyTuple_SET_ITEM(t, 0, e);
    PyTuple_SET_ITEM(t, 1, PyLong_FromLong(f->kind)); /* small ints: cached, cannot fail */
    PyTuple_SET_ITEM(t, 2, f->head != NULL ? f->head : Py_NewRef(Py_None));
    PyTuple_SET_ITEM(t, 3, f->num != NULL ? f->num : Py_NewRef(Py_None));
    f->head = NULL; /* references moved into the tuple */
    f->num = NULL;
    f->kind = KIND_NORMAL;
    f->idx = 0;
    int r = PyList_Append(frames, t);
    Py_DECREF(t);
    return r;
}

/* A length as Python's int() reads it (the reference framer uses int()), saturated at +-2**60; -1 and an
 * exception if it is not a number. */
static int reply_int(const char *p, Py_ssize_t len, long long *out) {
    /* fast path: canonical decimal */
    Py_ssize_t i = 0;
    int neg = 0;
    if (len > 0 && p[0] == '-') {
        neg = 1;
        i = 1;
    }
    if (i < len && len - i <= 18) {
        long long v = 0;
        Py_ssize_t j = i;
        for (; j < len; j++) {
            unsigned char c = (unsigned char)p[j];
            if (c < '0' || c > '9')
                break;
            v = v * 10 + (c - '0');
        }
        if (j == len) {
            *out = neg ? -v : v;
            return 0;
        }
    }
    /* anything else: exactly int(bytes) */
    PyObject *raw = PyBytes_FromStringAndSize(p, len);
    if (raw == NULL)
        return -1;
    PyObject *v = PyNumber_Long(raw);
    Py_DECREF(raw);
    if (v == NULL)
        goto bad;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        goto bad;
    /* Python's int() has no bound. Beyond 2**60 a length or count can never be reached by a
     * stream, so saturating it there frames exactly as the reference does (a wait that never ends,
     * or a null), and doubling a map's count cannot overflow. */
    if (overflow > 0 || x > SATURATED)
        x = SATURATED;
    else if (overflow < 0 || x < -SATURATED)
        x = -SATURATED;
    *out = x;
    return 0;
bad:
    PyErr_Clear();
    PyErr_SetString(ProtocolError, "Protocol error: bad length in reply");
    return -1;
}

static PyObject *Framer_feed(Framer *f, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *frames = PyList_New(0);
    PyObject *joined = NULL;
    if (frames == NULL)
        goto fail;
    f->plain = 1;
    const char *data = view.buf;
    Py_ssize_t dlen = view.len;
    const char *buf;
    Py_ssize_t n, off = 0, pos = 0;

    if (f->skip) {
        if (f->skip >= dlen) {
            f->skip -= dlen;
            if (f->skip == 0 && element_done(f, frames, dlen) < 0)
                goto fail;
            PyBuffer_Release(&view);
            return frames;
        }
        pos = f->skip;
        f->skip = 0;
        if (element_done(f, frames, pos) < 0)
            goto fail;
        buf = data;
        n = dlen;
    } else if (f->partial != NULL) {
        Py_ssize_t plen = PyBytes_GET_SIZE(f->partial);
        joined = PyBytes_FromStringAndSize(NULL, plen + dlen);
        if (joined == NULL)
            goto fail;
        memcpy(PyBytes_AS_STRING(joined), PyBytes_AS_STRING(f->partial), (size_t)plen);
        memcpy(PyBytes_AS_STRING(joined) + plen, data, (size_t)dlen);
        Py_CLEAR(f->partial);
        buf = PyBytes_AS_STRING(joined);
        n = plen + dlen;
        off = plen;
    } else {
        buf = data;
        n = dlen;
    }

    while (pos < n) {
        unsigned char t = (unsigned char)buf[pos];
        const char *nlp;
        if (f->depth == 0) {
            /* the most common top-level replies */
            if (t == '+' || t == ':') {
                nlp = find_crlf(buf + pos, buf + n);
                if (nlp == NULL)
                    break;
                pos = (nlp - buf) + 2;
                if (element_done(f, frames, pos - off) < 0)
                    goto fail;
                continue;
            }
            if (t == '$') {
                nlp = find_crlf(buf + pos, buf + n);
                if (nlp == NULL)
                    break;
                Py_ssize_t nl = nlp - buf;
                long long blen;
                if (reply_int(buf + pos + 1, nl - pos - 1, &blen) < 0)
                    goto fail;
                Py_ssize_t end = blen < 0 ? nl + 2 : nl + 4 + (Py_ssize_t)blen;
                if (end <= n) {
                    pos = end;
                    f->kind = KIND_NORMAL;
                    if (element_done(f, frames, pos - off) < 0)
                        goto fail;
                    continue;
                }
            }
        }
        nlp = find_crlf(buf + pos, buf + n);
        if (nlp == NULL)
            break;
        Py_ssize_t nl = nlp - buf;
        switch (t) {
        case '+': case '-': case ':': case '_': case ',': case '#': case '(': {
            if (f->depth == 0) {
                f->kind = t == '-' ? KIND_ERROR : KIND_NORMAL;
            } else if (f->depth == 1 && !f->attr[0]) {
                if (f->idx == 0 && t == '+' && nl - pos - 1 <= HEAD_MAX) {
                    PyObject *h = PyBytes_FromStringAndSize(buf + pos + 1, nl - pos - 1);
                    if (h == NULL)
                        goto fail;
                    Py_XSETREF(f->head, h);
                } else if (f->idx == 2 && t == ':') {
                    PyObject *raw = PyBytes_FromStringAndSize(buf + pos + 1, nl - pos - 1);
                    if (raw == NULL)
                        goto fail;
                    PyObject *v = PyNumber_Long(raw);
                    Py_DECREF(raw);
                    if (v == NULL) {
                        PyErr_Clear();
                        PyErr_SetString(ProtocolError, "Protocol error: bad length in reply");
                        goto fail;
                    }
                    Py_XSETREF(f->num, v);
                }
            }
            pos = nl + 2;
            if (element_done(f, frames, pos - off) < 0)
                goto fail;
            break;
        }
        case '$': case '=': case '!': {
            long long blen;
            if (reply_int(buf + pos + 1, nl - pos - 1, &blen) < 0)
                goto fail;
            if (f->depth == 0)
                f->kind = t == '!' ? KIND_ERROR : KIND_NORMAL;
            if (blen < 0) {
                pos = nl + 2;
                if (element_done(f, frames, pos - off) < 0)
                    goto fail;
                break;
            }
            if (f->depth == 1 && f->idx == 0 && blen <= HEAD_MAX && !f->attr[0]) {
                Py_ssize_t end = nl + 2 + (Py_ssize_t)blen;
                if (end + 2 > n)
                    goto stop; /* keep the short head whole: wait for more */
                PyObject *h = PyBytes_FromStringAndSize(buf + nl + 2, (Py_ssize_t)blen);
                if (h == NULL)
                    goto fail;
                Py_XSETREF(f->head, h);
                pos = end + 2;
                if (element_done(f, frames, pos - off) < 0)
                    goto fail;
                break;
            }
            Py_ssize_t end = nl + 4 + (Py_ssize_t)blen;
            if (end <= n) {
                pos = end;
                if (element_done(f, frames, pos - off) < 0)
                    goto fail;
            } else {
                f->skip = end - n;
                pos = n;
            }
            break;
        }
        case '*': case '~': case '>': case '%': case '|': {
            long long count;
            if (reply_int(buf + pos + 1, nl - pos - 1, &count) < 0)
                goto fail;
            pos = nl + 2;
            if (t == '%' || t == '|')
                count *= 2;
            if (f->depth == 0 && t != '|') {
                if (count < 0)
                    f->kind = KIND_NORMAL; /* *-1: a null, not an array */
                else
                    f->kind = t == '>' ? KIND_PUSH : t == '*' ? KIND_ARRAY : KIND_NORMAL;
                f->idx = 0;
                Py_CLEAR(f->head);
                Py_CLEAR(f->num);
            }
            if (count <= 0) {
                if (t != '|' && element_done(f, frames, pos - off) < 0)
                    goto fail;
                break;
            }
            if (framer_push(f, (Py_ssize_t)count, t == '|') < 0)
                goto fail;
            break;
        }
        default: {
            PyObject *ch = PyUnicode_FromOrdinal(t);
            if (ch != NULL) {
                PyErr_Format(ProtocolError, "Protocol error: unexpected reply type byte %R", ch);
                Py_DECREF(ch);
            }
            goto fail;
        }
        }
    }
stop:
    if (pos < n) {
        if (n - pos > MAX_INLINE) {
            PyErr_SetString(ProtocolError, "Protocol error: reply header too long");
            goto fail;
        }
        f->partial = PyBytes_FromStringAndSize(buf + pos, n - pos);
        if (f->partial == NULL)
            goto fail;
    }
    Py_XDECREF(joined);
    PyBuffer_Release(&view);
    return frames;
fail:
    Py_XDECREF(frames);
    Py_XDECREF(joined);
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *Framer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "ReplyFramer() takes no arguments");
        return NULL;
    }
    Framer *f = (Framer *)type->tp_alloc(type, 0);
    if (f == NULL)
        return NULL;
    f->kind = KIND_NORMAL;
    return (PyObject *)f;
}

static void Framer_dealloc(Framer *f) {
    PyMem_Free(f->stack);
    PyMem_Free(f->attr);
    Py_XDECREF(f->partial);
    Py_XDECREF(f->head);
    Py_XDECREF(f->num);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyObject *Framer_in_frame(Framer *f, void *closure) {
    return PyBool_FromLong(f->depth || f->skip || (f->partial != NULL && PyBytes_GET_SIZE(f->partial)));
}

static PyObject *Framer_plain(Framer *f, void *closure) { return PyBool_FromLong(f->plain); }

static PyMethodDef Framer_methods[] = {
    {"feed", (PyCFunction)Framer_feed, METH_O,
     "feed(data) -> list of (end, kind, head, num) for the frames completed in data"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Framer_getset[] = {
    {"in_frame", (getter)Framer_in_frame, NULL, "part of a frame is held", NULL},
    {"plain", (getter)Framer_plain, NULL,
     "every frame of the last feed was an ordinary reply: no error, push or pub/sub-shaped array", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.ReplyFramer",
    .tp_basicsize = sizeof(Framer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Incremental RESP2/RESP3 reply framer (C twin of proxy.resp.ReplyFramer).",
    .tp_new = Framer_new,
    .tp_dealloc = (destructor)Framer_dealloc,
    .tp_methods = Framer_methods,
    .tp_getset = Framer_getset,
};

/* ------------------------------------------------------------------------------------------------ */
/* latency histogram: the C twin of proxy.metrics.Histogram (the same counts, total and n) */

typedef struct {
    PyObject_HEAD
    PyObject *bounds; /* tuple of floats, ascending (proxy.metrics.LATENCY_BUCKETS) */
    PyObject *counts; /* list of ints, len(bounds) + 1 */
    double total;
    long long n;
} Hist;

static PyObject *Hist_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *bounds;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Histogram(bounds) takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &bounds))
        return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds);
    for (Py_ssize_t i = 0; i < nb; i++) {
        if (!PyFloat_CheckExact(PyTuple_GET_ITEM(bounds, i))) {
            PyErr_SetString(PyExc_TypeError, "Histogram bounds must be floats");
            return NULL;
        }
    }
    Hist *h = (Hist *)type->tp_alloc(type, 0);
    if (h == NULL)
        return NULL;
    h->counts = PyList_New(nb + 1);
    if (h->counts == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    for (Py_ssize_t i = 0; i <= nb; i++) {
        PyObject *zero = PyLong_FromLong(0);
        if (zero == NULL) {
            Py_DECREF(h);
            return NULL;
        }
        PyList_SET_ITEM(h->counts, i, zero);
    }
    h->bounds = Py_NewRef(bounds);
    h->total = 0.0;
    h->n = 0;
    return (PyObject *)h;
}

static void Hist_dealloc(Hist *h) {
    Py_XDECREF(h->bounds);
    Py_XDECREF(h->counts);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

/* observe(seconds, n=1): counts[bisect_left(bounds, seconds)] += n; total += seconds * n; n += n.
 * (counts is a list Python code can reach: its size is checked, and the item held across the
 * addition, which may run Python code) */
static PyObject *Hist_observe(Hist *h, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 && nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "observe(seconds, n=1)");
        return NULL;
    }
    double x = PyFloat_AsDouble(args[0]);
    if (x == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *one = NULL;
    PyObject *nobj = nargs == 2 ? args[1] : (one = PyLong_FromLong(1));
    if (nobj == NULL)
        return NULL;
    long long k = PyLong_AsLongLong(nobj);
    if (k == -1 && PyErr_Occurred()) {
        Py_XDECREF(one);
        return NULL;
    }
    if ((k > 0 && h->n > LLONG_MAX - k) || (k < 0 && h->n < LLONG_MIN - k)) {
        Py_XDECREF(one);
        PyErr_SetString(PyExc_OverflowError, "Histogram sample count out of range");
        return NULL;
    }
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(h->bounds);
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(h->bounds, mid)) < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo >= PyList_GET_SIZE(h->counts)) {
        Py_XDECREF(one);
        PyErr_SetString(PyExc_RuntimeError, "Histogram counts lost their buckets");
        return NULL;
    }
    PyObject *old = Py_NewRef(PyList_GET_ITEM(h->counts, lo));
    PyObject *sum = PyNumber_Add(old, nobj);
    Py_DECREF(old);
    Py_XDECREF(one);
    if (sum == NULL)
        return NULL;
    if (lo >= PyList_GET_SIZE(h->counts)) {
        Py_DECREF(sum);
        PyErr_SetString(PyExc_RuntimeError, "Histogram counts lost their buckets");
        return NULL;
    }
    if (PyList_SetItem(h->counts, lo, sum) < 0) /* (steals sum, releases the item it replaces) */
        return NULL;
    h->total += x * (double)k;
    h->n += k;
    Py_RETURN_NONE;
}

static PyMethodDef Hist_methods[] = {
    {"observe", (PyCFunction)(void (*)(void))Hist_observe, METH_FASTCALL,
     "observe(seconds, n=1): one more sample (n of them) of this many seconds"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Hist_members[] = {
    {"counts", T_OBJECT_EX, offsetof(Hist, counts), READONLY, "samples per bucket (the last: above every bound)"},
    {"total", T_DOUBLE, offsetof(Hist, total), 0, "sum of the samples"},
    {"n", T_LONGLONG, offsetof(Hist, n), 0, "number of samples"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HistType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.Histogram",
    .tp_basicsize = sizeof(Hist),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Latency histogram (C twin of proxy.metrics.Histogram): Histogram(bounds).",
    .tp_new = Hist_new,
    .tp_dealloc = (destructor)Hist_dealloc,
    .tp_methods = Hist_methods,
    .tp_members = Hist_members,
};

/* ------------------------------------------------------------------------------------------------ */
/* module */

static PyObject *init(PyObject *module, PyObject *args) {
    PyObject *exc, *nokey;
    if (!PyArg_ParseTuple(args, "OO", &exc, &nokey))
        return NULL;
    Py_XSETREF(ProtocolError, Py_NewRef(exc));
    Py_XSETREF(NoKey, Py_NewRef(nokey));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buf, start, max_bulk, names, fast) -> (items, end, need, count)"},
    {"init", init, METH_VARARGS, "init(ProtocolError, NOKEY): the objects this module hands out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "proxy._speedups", "respmeter's hot path in C (see proxy/_speedups.c).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&FramerType) < 0 || PyType_Ready(&HistType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "ReplyFramer", (PyObject *)&FramerType) < 0
        || PyModule_AddObjectRef(m, "Histogram", (PyObject *)&HistType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
