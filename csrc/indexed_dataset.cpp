// Memory-mapped MMIDIDX reader and streaming writer (to be filled in).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_indexed_dataset(py::module_& m) { (void)m; }
