// CPython bindings of the native codec: threelc._native.
//
// The functions take raw data pointers (tensor.data_ptr()) and sizes, so the extension
// builds without torch headers. threelc/backends.py checks dtypes, devices, sizes and
// contiguity before calling; every call releases the GIL while it works.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "codec.h"

namespace {

using namespace threelc;

template <class T>
T* ptr(unsigned long long address) { return reinterpret_cast<T*>(static_cast<uintptr_t>(address)); }

Segments segments_of(unsigned long long lengths, unsigned long long offsets, long long count) {
  Segments seg;
  seg.count = count;
  seg.length = ptr<const int64_t>(lengths);
  seg.offset = ptr<const int64_t>(offsets);
  seg.prepare();
  return seg;
}

PyObject* py_encode(PyObject*, PyObject* args) {
  unsigned long long x, residual, residual_out, lengths, offsets, out, scales_out, scale_cap;
  int x_dtype, header_dtype, zre, threads, bounded;
  long long count;
  double sparsity;
  if (!PyArg_ParseTuple(args, "KiKKKKLdipKKipK", &x, &x_dtype, &residual, &residual_out, &lengths, &offsets, &count,
                        &sparsity, &header_dtype, &zre, &out, &scales_out, &threads, &bounded, &scale_cap))
    return nullptr;
  Segments seg = segments_of(lengths, offsets, count);
  EncodeArgs a{ptr<const void>(x), x_dtype, ptr<const float>(residual), ptr<float>(residual_out), &seg,
               static_cast<float>(sparsity), header_dtype, zre != 0, ptr<uint8_t>(out), ptr<float>(scales_out), threads,
               bounded != 0, ptr<const float>(scale_cap)};
  EncodeResult r;
  Py_BEGIN_ALLOW_THREADS
  r = encode(a);
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(LOL)", static_cast<long long>(r.length), r.finite ? Py_True : Py_False,
                       static_cast<long long>(r.zeros));
}

PyObject* py_payload_capacity(PyObject*, PyObject* args) {
  long long count, numel;
  if (!PyArg_ParseTuple(args, "LL", &count, &numel)) return nullptr;
  return PyLong_FromLongLong(payload_capacity(count, numel));
}

PyObject* py_absmax(PyObject*, PyObject* args) {
  unsigned long long x, residual, lengths, offsets, out;
  int x_dtype, threads, bounded;
  long long count;
  if (!PyArg_ParseTuple(args, "KiKKKLKip", &x, &x_dtype, &residual, &lengths, &offsets, &count, &out, &threads,
                        &bounded))
    return nullptr;
  Segments seg = segments_of(lengths, offsets, count);
  Py_BEGIN_ALLOW_THREADS
  segment_absmax(ptr<const void>(x), x_dtype, ptr<const float>(residual), seg, ptr<float>(out), threads, bounded != 0);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_decode(PyObject*, PyObject* args) {
  unsigned long long payloads, payload_lengths, lengths, offsets, out;
  long long npayloads, count;
  int average, threads;
  if (!PyArg_ParseTuple(args, "KKLKKLKpi", &payloads, &payload_lengths, &npayloads, &lengths, &offsets, &count, &out,
                        &average, &threads))
    return nullptr;
  Segments seg = segments_of(lengths, offsets, count);
  DecodeArgs a{npayloads, ptr<const uint8_t* const>(payloads), ptr<const int64_t>(payload_lengths), &seg,
               ptr<float>(out), average != 0, threads};
  std::string error;
  int64_t status;
  Py_BEGIN_ALLOW_THREADS
  status = decode(a, &error);
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(Ls)", static_cast<long long>(status), error.c_str());
}

PyObject* py_encode_lanes(PyObject*, PyObject* args) {
  unsigned long long x, residual, residual_out, lengths, offsets, scales, words;
  int x_dtype, world, threads;
  long long count;
  if (!PyArg_ParseTuple(args, "KiKKKKLKiKi", &x, &x_dtype, &residual, &residual_out, &lengths, &offsets, &count,
                        &scales, &world, &words, &threads))
    return nullptr;
  Segments seg = segments_of(lengths, offsets, count);
  LaneArgs a{ptr<const void>(x), x_dtype, ptr<const float>(residual), ptr<float>(residual_out), &seg,
             ptr<const float>(scales), world, ptr<int64_t>(words), threads};
  int64_t zeros;
  Py_BEGIN_ALLOW_THREADS
  zeros = encode_lanes(a);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(zeros);
}

PyObject* py_decode_lanes(PyObject*, PyObject* args) {
  unsigned long long words, scales, lengths, offsets, out;
  long long count;
  int world, threads;
  if (!PyArg_ParseTuple(args, "KKKKLiKi", &words, &scales, &lengths, &offsets, &count, &world, &out, &threads))
    return nullptr;
  Segments seg = segments_of(lengths, offsets, count);
  Py_BEGIN_ALLOW_THREADS
  decode_lanes(ptr<const int64_t>(words), ptr<const float>(scales), seg, world, ptr<float>(out), threads);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_lanes_per_word(PyObject*, PyObject* args) {
  int world;
  if (!PyArg_ParseTuple(args, "i", &world)) return nullptr;
  return PyLong_FromLong(lanes_per_word(world));
}

PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS, "Fused encode with error feedback into a preallocated payload buffer."},
    {"payload_capacity", py_payload_capacity, METH_VARARGS, "Largest payload for (segments, numel)."},
    {"absmax", py_absmax, METH_VARARGS, "max|x + residual| per segment (bounded: at most max|x|)."},
    {"decode", py_decode, METH_VARARGS, "Decode and sum N payloads; returns (status, message)."},
    {"encode_lanes", py_encode_lanes, METH_VARARGS, "Quantize with agreed scales into lane-packed int64 words."},
    {"decode_lanes", py_decode_lanes, METH_VARARGS, "Average from summed lane words."},
    {"lanes_per_word", py_lanes_per_word, METH_VARARGS, "Lanes in one int64 word for a world size."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "threelc's fused CPU codec (see threelc/backends.py).", -1,
                      methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native() { return PyModule_Create(&module); }
