// tensor_states(tensors) -> bytes: for every tensor, its version counter, data pointer, dtype
// and device, and its sizes and strides, packed as int64s. The models compare it once per
// forward to know their prepared plans are still those of the current weights
// (resnet_fast/models/_fused.py). Sizes and strides are part of it because `t.data =
// t.data[:32]` or `w.data = w.data.transpose(2, 3)` keeps both the pointer and the version.
// Here it costs ~20 ns a tensor where reading it all from Python costs ~1 us.
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

extern "C" PyObject* resnet_fast_tensor_states(PyObject* /*module*/, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "tensor_states: expected a list of tensors");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<int64_t> out;
  out.reserve(12 * static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) {
      PyErr_Format(PyExc_TypeError,
                   "tensor_states: expected a list of tensors, got %s at index %zd",
                   Py_TYPE(items[i])->tp_name, i);
      Py_DECREF(seq);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    if (t.is_inference()) {  // no version counter (Tensor._version raises the same)
      PyErr_SetString(PyExc_RuntimeError,
                      "tensor_states: inference tensors do not track version counters");
      Py_DECREF(seq);
      return nullptr;
    }
    out.push_back(static_cast<int64_t>(t._version()));
    out.push_back(t.has_storage() ? reinterpret_cast<int64_t>(t.const_data_ptr()) : 0);
    out.push_back(static_cast<int64_t>(t.scalar_type()) |
                  (static_cast<int64_t>(t.device().type()) << 16) |
                  (static_cast<int64_t>(t.device().index() + 1) << 32));
    out.push_back(t.dim());
    for (const int64_t s : t.sizes()) out.push_back(s);
    for (const int64_t s : t.strides()) out.push_back(s);
  }
  Py_DECREF(seq);
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
}
