/* The zero-work pooled forwarder (bench/pool_forwarder.py) with its two protocols written as C
 * types: the same uvloop loop and transports call them, so what is left is the event loop, the
 * system calls and the routing, with no interpreter work per request. A benchmark tool only
 * (bench/c_pool_forwarder.py builds and runs it): it assumes what redis-benchmark sends (well-formed
 * requests, no blocking commands, no pub/sub, nothing connection-specific).
 *
 * Shared: the one upstream connection. Client: each client connection. A client's complete
 * requests go into the shared write buffer with a route (client, replies due); the buffer goes
 * out once per loop turn (call_soon), or at once while one client at a time uses it. Replies are
 * cut at frame boundaries and written to each client in order, a run at a time. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct Client Client;
typedef struct { Client *c; Py_ssize_t n; } Route;

typedef struct {
    PyObject_HEAD
    PyObject *write;      /* the upstream transport's write */
    PyObject *call_soon;  /* loop.call_soon */
    PyObject *flush;      /* self.flush, bound */
    Route *routes; Py_ssize_t rh, rt, rcap;  /* ring of routes: [rh, rt) */
    char *out; Py_ssize_t olen, ocap, nout;  /* what goes upstream at the next flush */
    int scheduled, solo;
    char *part; Py_ssize_t plen, pcap;       /* the start of a reply cut across reads */
} Shared;

struct Client {
    PyObject_HEAD
    PyObject *write;
    Shared *shared;
    char *part; Py_ssize_t plen, pcap;       /* the start of a request cut across reads */
};

static Shared *the_shared;

static int grow(char **b, Py_ssize_t *cap, Py_ssize_t need) {
    if (need <= *cap) return 0;
    Py_ssize_t nc = *cap ? *cap : 4096;
    while (nc < need) nc *= 2;
    char *nb = PyMem_Realloc(*b, nc);
    if (!nb) { PyErr_NoMemory(); return -1; }
    *b = nb;
    *cap = nc;
    return 0;
}

static const char *find_crlf(const char *p, const char *e) {
    while (p + 1 < e) {
        const char *q = memchr(p, '\r', e - p - 1);
        if (!q) return NULL;
        if (q[1] == '\n') return q;
        p = q + 1;
    }
    return NULL;
}

static long long number(const char *p, const char *e) {
    int neg = 0;
    long long v = 0;
    if (p < e && *p == '-') { neg = 1; p++; }
    while (p < e) v = v * 10 + (*p++ - '0');
    return neg ? -v : v;
}

/* The end of the one complete RESP2/RESP3 frame at p, or NULL when it is not complete yet. */
static const char *frame_end(const char *p, const char *e) {
    long long pending = 1;
    while (pending > 0) {
        if (p >= e) return NULL;
        char t = *p;
        const char *l = find_crlf(p + 1, e);
        if (!l) return NULL;
        long long v = number(p + 1, l);
        p = l + 2;
        pending--;
        if ((t == '$' || t == '=' || t == '!') && v >= 0) {  /* bulk, verbatim, blob error */
            if (e - p < v + 2) return NULL;
            p += v + 2;
        } else if ((t == '*' || t == '~' || t == '>') && v > 0) {  /* array, set, push */
            pending += v;
        } else if (t == '%' && v > 0) {  /* map */
            pending += 2 * v;
        } else if (t == '|' && v > 0) {  /* attribute: then the reply it annotates */
            pending += 2 * v + 1;
        }
    }
    return p;
}

/* Join what is kept from the last read with this one: (buffer, length), the buffer being the
 * bytes object's own when nothing was kept. */
static int joined(char **part, Py_ssize_t *plen, Py_ssize_t *pcap, PyObject *data, const char **b, Py_ssize_t *len) {
    if (!*plen) {
        *b = PyBytes_AS_STRING(data);
        *len = PyBytes_GET_SIZE(data);
        return 0;
    }
    if (grow(part, pcap, *plen + PyBytes_GET_SIZE(data)) < 0) return -1;
    memcpy(*part + *plen, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
    *plen += PyBytes_GET_SIZE(data);
    *b = *part;
    *len = *plen;
    return 0;
}

/* Keep [p, e) for the next read: p points into *part when in_part, else into the bytes object. */
static int keep(char **part, Py_ssize_t *plen, Py_ssize_t *pcap, int in_part, const char *p, const char *e) {
    Py_ssize_t rest = e - p;
    if (rest && !in_part && grow(part, pcap, rest) < 0) return -1;
    if (rest && p != *part) memmove(*part, p, rest);
    *plen = rest;
    return 0;
}

static int call_write(PyObject *write, PyObject *whole, const char *p, Py_ssize_t n) {
    PyObject *b = whole ? (Py_INCREF(whole), whole) : PyBytes_FromStringAndSize(p, n);
    if (!b) return -1;
    PyObject *r = PyObject_CallOneArg(write, b);
    Py_DECREF(b);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* ---- Shared -------------------------------------------------------------------------------- */

static PyObject *Shared_flush(Shared *s, PyObject *unused) {
    s->scheduled = 0;
    s->solo = s->nout <= 1;
    s->nout = 0;
    if (s->olen) {
        Py_ssize_t n = s->olen;
        s->olen = 0;
        if (call_write(s->write, NULL, s->out, n) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static int push_route(Shared *s, Client *c, Py_ssize_t n) {
    if (s->rt > s->rh && s->routes[(s->rt - 1) % s->rcap].c == c) {
        s->routes[(s->rt - 1) % s->rcap].n += n;
        return 0;
    }
    if (s->rt - s->rh == s->rcap) {
        Py_ssize_t nc = s->rcap ? s->rcap * 2 : 256;
        Route *nr = PyMem_Malloc(nc * sizeof(Route));
        if (!nr) { PyErr_NoMemory(); return -1; }
        for (Py_ssize_t i = s->rh; i < s->rt; i++) nr[i - s->rh] = s->routes[i % s->rcap];
        s->rt -= s->rh;
        s->rh = 0;
        PyMem_Free(s->routes);
        s->routes = nr;
        s->rcap = nc;
    }
    Py_INCREF(c);
    s->routes[s->rt % s->rcap] = (Route){c, n};
    s->rt++;
    return 0;
}

static int shared_send(Shared *s, Client *c, PyObject *whole, const char *p, Py_ssize_t len, Py_ssize_t n) {
    int idle = s->rt == s->rh && s->olen == 0;
    if (push_route(s, c, n) < 0) return -1;
    if (idle && s->solo) return call_write(s->write, whole, p, len);
    if (grow(&s->out, &s->ocap, s->olen + len) < 0) return -1;
    memcpy(s->out + s->olen, p, len);
    s->olen += len;
    s->nout++;
    if (!s->scheduled) {
        s->scheduled = 1;
        PyObject *r = PyObject_CallOneArg(s->call_soon, s->flush);
        if (!r) return -1;
        Py_DECREF(r);
    }
    return 0;
}

static PyObject *Shared_data_received(Shared *s, PyObject *data) {
    const char *b;
    Py_ssize_t len;
    int in_part = s->plen != 0;
    PyObject *whole = in_part ? NULL : data;
    if (!PyBytes_Check(data)) return PyErr_Format(PyExc_TypeError, "bytes expected");
    if (joined(&s->part, &s->plen, &s->pcap, data, &b, &len) < 0) return NULL;
    const char *e = b + len, *start = b;
    while (start < e && s->rt > s->rh) {
        Route *h = &s->routes[s->rh % s->rcap];
        const char *q = start;
        Py_ssize_t got = 0;
        while (got < h->n) {
            const char *x = frame_end(q, e);
            if (!x) break;
            q = x;
            got++;
        }
        if (!got) break;
        Client *c = h->c;
        h->n -= got;
        int done = h->n == 0;
        if (done) s->rh++;
        int rc = call_write(c->write, (whole && start == b && q == e) ? whole : NULL, start, q - start);
        if (done) Py_DECREF(c);
        if (rc < 0) return NULL;
        start = q;
        if (!done) break;  /* its next reply is not complete yet */
    }
    if (keep(&s->part, &s->plen, &s->pcap, in_part, start, e) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Shared_connection_made(Shared *s, PyObject *transport) {
    Py_XSETREF(s->write, PyObject_GetAttrString(transport, "write"));
    if (!s->write) return NULL;
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (!asyncio) return NULL;
    PyObject *loop = PyObject_CallMethod(asyncio, "get_running_loop", NULL);
    Py_DECREF(asyncio);
    if (!loop) return NULL;
    Py_XSETREF(s->call_soon, PyObject_GetAttrString(loop, "call_soon"));
    Py_DECREF(loop);
    if (!s->call_soon) return NULL;
    Py_XSETREF(s->flush, PyObject_GetAttrString((PyObject *)s, "flush"));
    if (!s->flush) return NULL;
    s->solo = 1;
    Py_RETURN_NONE;
}

static PyObject *none_1(PyObject *self, PyObject *arg) { Py_RETURN_NONE; }
static PyObject *false_0(PyObject *self, PyObject *unused) { Py_RETURN_FALSE; }

static PyMethodDef Shared_methods[] = {
    {"connection_made", (PyCFunction)Shared_connection_made, METH_O, NULL},
    {"data_received", (PyCFunction)Shared_data_received, METH_O, NULL},
    {"connection_lost", (PyCFunction)none_1, METH_O, NULL},
    {"eof_received", (PyCFunction)false_0, METH_NOARGS, NULL},
    {"pause_writing", (PyCFunction)false_0, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)false_0, METH_NOARGS, NULL},
    {"flush", (PyCFunction)Shared_flush, METH_NOARGS, NULL},
    {NULL}
};

static PyTypeObject SharedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "c_pool_forwarder.Shared",
    .tp_basicsize = sizeof(Shared),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_methods = Shared_methods,
};

/* ---- Client -------------------------------------------------------------------------------- */

static PyObject *Client_connection_made(Client *c, PyObject *transport) {
    if (!the_shared) return PyErr_Format(PyExc_RuntimeError, "set_shared() first");
    Py_XSETREF(c->write, PyObject_GetAttrString(transport, "write"));
    if (!c->write) return NULL;
    Py_INCREF(the_shared);
    Py_XSETREF(c->shared, the_shared);
    Py_RETURN_NONE;
}

static PyObject *Client_data_received(Client *c, PyObject *data) {
    const char *b;
    Py_ssize_t len;
    int in_part = c->plen != 0;
    PyObject *whole = in_part ? NULL : data;
    if (!PyBytes_Check(data)) return PyErr_Format(PyExc_TypeError, "bytes expected");
    if (joined(&c->part, &c->plen, &c->pcap, data, &b, &len) < 0) return NULL;
    const char *e = b + len, *p = b;
    Py_ssize_t n = 0;
    for (;;) {
        const char *x = frame_end(p, e);
        if (!x) break;
        p = x;
        n++;
    }
    if (n && shared_send(c->shared, c, p == e ? whole : NULL, b, p - b, n) < 0) return NULL;
    if (keep(&c->part, &c->plen, &c->pcap, in_part, p, e) < 0) return NULL;
    Py_RETURN_NONE;
}

static void Client_dealloc(Client *c) {
    Py_XDECREF(c->write);
    Py_XDECREF(c->shared);
    PyMem_Free(c->part);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Client_methods[] = {
    {"connection_made", (PyCFunction)Client_connection_made, METH_O, NULL},
    {"data_received", (PyCFunction)Client_data_received, METH_O, NULL},
    {"connection_lost", (PyCFunction)none_1, METH_O, NULL},
    {"eof_received", (PyCFunction)false_0, METH_NOARGS, NULL},
    {"pause_writing", (PyCFunction)false_0, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)false_0, METH_NOARGS, NULL},
    {NULL}
};

static PyTypeObject ClientType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "c_pool_forwarder.Client",
    .tp_basicsize = sizeof(Client),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_methods = Client_methods,
    .tp_dealloc = (destructor)Client_dealloc,
};

static PyObject *set_shared(PyObject *module, PyObject *s) {
    if (!PyObject_TypeCheck(s, &SharedType)) return PyErr_Format(PyExc_TypeError, "a Shared expected");
    Py_INCREF(s);
    Py_XSETREF(the_shared, (Shared *)s);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {{"set_shared", set_shared, METH_O, NULL}, {NULL}};
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "c_pool_forwarder", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit_c_pool_forwarder(void) {
    if (PyType_Ready(&SharedType) < 0 || PyType_Ready(&ClientType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    Py_INCREF(&SharedType);
    Py_INCREF(&ClientType);
    if (PyModule_AddObject(m, "Shared", (PyObject *)&SharedType) < 0 ||
        PyModule_AddObject(m, "Client", (PyObject *)&ClientType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
