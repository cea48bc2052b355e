// engine._C: the one extension module. Each source file registers its own part.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_indexed_dataset(py::module_& m);
void register_sample_index(py::module_& m);
void register_sar_batch(py::module_& m);

PYBIND11_MODULE(_C, m) {
    m.doc() = "ltu-engine C++ core: memory-mapped indexed dataset, sample index and blending, SAR record texts and word cache";
    register_indexed_dataset(m);
    register_sample_index(m);
    register_sar_batch(m);
}
