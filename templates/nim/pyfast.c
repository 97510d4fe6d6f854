/* nnbridge: the thin CPython binding of a compiled generated Nim module (the batch-1 fast path).
 *
 * A ctypes call costs about 1.5 us and ndarray.ctypes.data as much again; this module calls
 * the library's exported `<name>_infer_batch(x, n, out)` through its address instead, from a
 * METH_FASTCALL builtin, with the input and output as numpy buffers (never text).
 *
 *   bind(fn_address, n_inputs, n_outputs, error_class, label) -> callable
 *   callable(x) -> ndarray   x: [n_inputs] -> [n_outputs], or [n, n_inputs] -> [n, n_outputs]
 *
 * Inputs that are not C-contiguous float32 are converted once (like np.ascontiguousarray).
 * Batches above 4096 values are computed with the GIL released. Built and cached by
 * nnbridge.verify.nim; nothing here is specific to one network.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

typedef int (*nnb_batch_fn)(const float *x, Py_ssize_t n, float *out);

typedef struct {
  PyObject_HEAD
  nnb_batch_fn fn;
  Py_ssize_t n_in, n_out;
  PyObject *error; /* exception class raised when the library reports a failure */
  PyObject *label; /* str, for messages */
} BoundObject;

static void bound_dealloc(BoundObject *self) {
  Py_XDECREF(self->error);
  Py_XDECREF(self->label);
  Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject BoundType = {
  PyVarObject_HEAD_INIT(NULL, 0)
  .tp_name = "_nnb_nimfast.Bound",
  .tp_basicsize = sizeof(BoundObject),
  .tp_dealloc = (destructor)bound_dealloc,
  .tp_flags = Py_TPFLAGS_DEFAULT,
  .tp_doc = "a compiled network's batch function and sizes",
};

static PyObject *bound_call(PyObject *self_obj, PyObject *const *args, Py_ssize_t nargs) {
  BoundObject *self = (BoundObject *)self_obj;
  if (nargs != 1) {
    PyErr_Format(PyExc_TypeError, "expected one argument (the inputs), got %zd", nargs);
    return NULL;
  }
  PyObject *x = args[0];
  PyArrayObject *a;
  if (PyArray_CheckExact(x) && PyArray_TYPE((PyArrayObject *)x) == NPY_FLOAT32 &&
      PyArray_ISCARRAY_RO((PyArrayObject *)x) && PyArray_ISNOTSWAPPED((PyArrayObject *)x)) {
    a = (PyArrayObject *)x;
    Py_INCREF(a);
  } else {
    a = (PyArrayObject *)PyArray_FROM_OTF(x, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (a == NULL) return NULL;
  }
  const int ndim = PyArray_NDIM(a);
  const npy_intp *dims = PyArray_DIMS(a);
  npy_intp n, out_dims[2];
  if (ndim == 1 && dims[0] == self->n_in) {
    n = 1;
    out_dims[0] = self->n_out;
  } else if (ndim == 2 && dims[1] == self->n_in) {
    n = dims[0];
    out_dims[0] = n;
    out_dims[1] = self->n_out;
  } else {
    PyObject *shape = PyObject_GetAttrString((PyObject *)a, "shape");
    PyErr_Format(PyExc_ValueError, "%U takes %zd features per sample: expected shape [%zd] or [batch, %zd], found %R",
                 self->label, self->n_in, self->n_in, self->n_in, shape ? shape : Py_None);
    Py_XDECREF(shape);
    Py_DECREF(a);
    return NULL;
  }
  PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(ndim, out_dims, NPY_FLOAT32);
  if (out == NULL) {
    Py_DECREF(a);
    return NULL;
  }
  int rc = 0;
  if (n > 0) {
    const float *xp = (const float *)PyArray_DATA(a);
    float *yp = (float *)PyArray_DATA(out);
    if (n * self->n_in > 4096) {
      Py_BEGIN_ALLOW_THREADS
      rc = self->fn(xp, (Py_ssize_t)n, yp);
      Py_END_ALLOW_THREADS
    } else {
      rc = self->fn(xp, (Py_ssize_t)n, yp);
    }
  }
  Py_DECREF(a);
  if (rc != 0) {
    Py_DECREF(out);
    PyErr_Format(self->error, "%U: the compiled library returned %d (%s)", self->label, rc,
                 rc == -1 ? "no weights loaded" : rc == -3 ? "out of memory" : "bad arguments");
    return NULL;
  }
  return (PyObject *)out;
}

static PyMethodDef bound_call_def = {"infer", (PyCFunction)(void (*)(void))bound_call, METH_FASTCALL,
                                     "outputs of a sample [in] or a batch [n, in], float32"};

static PyObject *bind(PyObject *module, PyObject *args) {
  (void)module;
  unsigned long long address;
  Py_ssize_t n_in, n_out;
  PyObject *error, *label;
  if (!PyArg_ParseTuple(args, "KnnOU", &address, &n_in, &n_out, &error, &label)) return NULL;
  if (address == 0 || n_in <= 0 || n_out <= 0) {
    PyErr_SetString(PyExc_ValueError, "bind() needs a function address and positive sizes");
    return NULL;
  }
  BoundObject *b = PyObject_New(BoundObject, &BoundType);
  if (b == NULL) return NULL;
  b->fn = (nnb_batch_fn)(size_t)address;
  b->n_in = n_in;
  b->n_out = n_out;
  Py_INCREF(error);
  b->error = error;
  Py_INCREF(label);
  b->label = label;
  PyObject *f = PyCFunction_New(&bound_call_def, (PyObject *)b);
  Py_DECREF(b);
  return f;
}

static PyMethodDef methods[] = {
  {"bind", bind, METH_VARARGS, "bind(fn_address, n_inputs, n_outputs, error_class, label) -> callable"},
  {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_nnb_nimfast", NULL, -1, methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__nnb_nimfast(void) {
  import_array();
  if (PyType_Ready(&BoundType) < 0) return NULL;
  return PyModule_Create(&moduledef);
}
