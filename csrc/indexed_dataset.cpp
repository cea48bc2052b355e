// Python bindings of the MMIDIDX reader and writer (engine._C.IndexedReader / IndexedWriter).
// Token views are zero-copy numpy arrays over the .bin map whose base object holds the map, so a
// view stays valid after the reader that produced it is gone.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <memory>
#include <optional>
#include <string>

#include "indexed_reader.h"
#include "indexed_writer.h"

namespace py = pybind11;

namespace {

using ltu::IndexReader;
using ltu::IndexWriter;
using ltu::MappedFile;
using ltu::SourceType;

void make_read_only(py::array& a) {
    py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
}

class PyIndexedReader {
public:
    PyIndexedReader(const std::string& idx_path, const std::string& bin_path)
        : reader_(std::make_shared<IndexReader>(idx_path, bin_path)),
          bin_owner_(py::cast(reader_->bin())),
          dtype_(py::dtype(std::string(ltu::dtype_name(reader_->dtype_code())))) {}

    int64_t size() const { return static_cast<int64_t>(reader_->num_sequences()); }

    py::array get(int64_t index, int64_t offset, std::optional<int64_t> length) const {
        const int64_t n = size();
        const int64_t i = index < 0 ? index + n : index;
        if (i < 0 || i >= n)
            throw py::index_error("sequence index " + std::to_string(index) + " out of range for " +
                                  std::to_string(n) + " sequences");
        const int64_t len = reader_->length(static_cast<uint64_t>(i));
        if (offset < 0 || offset > len)
            throw py::index_error("offset " + std::to_string(offset) + " out of range for sequence " +
                                  std::to_string(i) + " of " + std::to_string(len) + " tokens");
        const int64_t count = length.has_value() ? *length : len - offset;
        if (count < 0 || count > len - offset)
            throw py::index_error("length " + std::to_string(count) + " at offset " +
                                  std::to_string(offset) + " runs past sequence " + std::to_string(i) +
                                  " of " + std::to_string(len) + " tokens");
        const size_t item = reader_->itemsize();
        const uint8_t* ptr = reader_->bin()->data() +
                             static_cast<size_t>(reader_->pointer(static_cast<uint64_t>(i))) +
                             static_cast<size_t>(offset) * item;
        py::array view(dtype_, {static_cast<py::ssize_t>(count)}, {static_cast<py::ssize_t>(item)}, ptr,
                       bin_owner_);
        make_read_only(view);
        return view;
    }

    // The .idx arrays are unaligned inside the map; hand out aligned read-only copies, made once.
    py::array sequence_lengths() {
        if (!lengths_) lengths_ = copy_array<int32_t>(reader_->lengths_bytes(), reader_->num_sequences());
        return *lengths_;
    }
    py::array sequence_pointers() {
        if (!pointers_) pointers_ = copy_array<int64_t>(reader_->pointers_bytes(), reader_->num_sequences());
        return *pointers_;
    }
    py::array document_indices() {
        if (!doc_indices_)
            doc_indices_ = copy_array<int64_t>(reader_->doc_indices_bytes(), reader_->num_doc_indices());
        return *doc_indices_;
    }

    int dtype_code() const { return reader_->dtype_code(); }
    py::dtype dtype() const { return dtype_; }
    uint64_t num_tokens() const { return reader_->num_tokens(); }
    uint64_t num_documents() const { return reader_->num_doc_indices() - 1; }
    const std::string& idx_path() const { return reader_->idx_path(); }
    const std::string& bin_path() const { return reader_->bin_path(); }

private:
    template <typename T>
    static py::array copy_array(const uint8_t* bytes, uint64_t count) {
        py::array_t<T> out(static_cast<py::ssize_t>(count));
        if (count > 0) std::memcpy(out.mutable_data(), bytes, count * sizeof(T));
        py::array a = out;
        make_read_only(a);
        return a;
    }

    std::shared_ptr<IndexReader> reader_;
    py::object bin_owner_;
    py::dtype dtype_;
    std::optional<py::array> lengths_, pointers_, doc_indices_;
};

// Maps a contiguous, native-endian numpy array to the writer's source type.
SourceType source_type_of(const py::array& a) {
    if (!(a.flags() & py::array::c_style))
        throw std::invalid_argument("token array must be C-contiguous");
    const py::dtype dt = a.dtype();
    const char order = dt.byteorder();
    if (order == '>') throw std::invalid_argument("token array must be in native byte order");
    const char kind = dt.kind();
    const auto size = dt.itemsize();
    if (kind == 'i') {
        if (size == 1) return SourceType::kI8;
        if (size == 2) return SourceType::kI16;
        if (size == 4) return SourceType::kI32;
        if (size == 8) return SourceType::kI64;
    } else if (kind == 'u') {
        if (size == 1) return SourceType::kU8;
        if (size == 2) return SourceType::kU16;
        if (size == 4) return SourceType::kU32;
        if (size == 8) return SourceType::kU64;
    } else if (kind == 'f') {
        if (size == 4) return SourceType::kF32;
        if (size == 8) return SourceType::kF64;
    }
    throw py::type_error("token ids must be integers (or floats for float datasets), got numpy dtype " +
                         py::str(static_cast<py::object>(dt)).cast<std::string>());
}

void raise_os_error(const ltu::SystemError& e) {
    py::object exc = py::reinterpret_borrow<py::object>(PyExc_OSError)(
        e.err, std::string(e.what()), e.path);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
}

}  // namespace

void register_indexed_dataset(py::module_& m) {
    py::register_exception<ltu::FormatError>(m, "IndexedDatasetError", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ltu::SystemError& e) {
            raise_os_error(e);
        }
    });

    py::class_<MappedFile, std::shared_ptr<MappedFile>>(
        m, "_MappedFile", "Read-only memory map of one file; the base object of token views.")
        .def_property_readonly("path", &MappedFile::path)
        .def_property_readonly("size", &MappedFile::size);

    py::class_<PyIndexedReader>(m, "IndexedReader",
                                "Validated memory map of an MMIDIDX .idx/.bin pair (use "
                                "engine.data.indexed.IndexedDataset).")
        .def(py::init<const std::string&, const std::string&>(), py::arg("idx_path"), py::arg("bin_path"))
        .def("__len__", &PyIndexedReader::size)
        .def("get", &PyIndexedReader::get, py::arg("index"), py::arg("offset") = 0,
             py::arg("length") = py::none(),
             "Zero-copy read-only view of tokens [offset, offset + length) of sequence index.")
        .def_property_readonly("sequence_lengths", &PyIndexedReader::sequence_lengths)
        .def_property_readonly("sequence_pointers", &PyIndexedReader::sequence_pointers)
        .def_property_readonly("document_indices", &PyIndexedReader::document_indices)
        .def_property_readonly("dtype", &PyIndexedReader::dtype)
        .def_property_readonly("dtype_code", &PyIndexedReader::dtype_code)
        .def_property_readonly("num_tokens", &PyIndexedReader::num_tokens)
        .def_property_readonly("num_documents", &PyIndexedReader::num_documents)
        .def_property_readonly("idx_path", &PyIndexedReader::idx_path)
        .def_property_readonly("bin_path", &PyIndexedReader::bin_path);

    py::class_<IndexWriter>(m, "IndexedWriter",
                            "Streaming MMIDIDX writer (use engine.data.indexed.IndexedDatasetBuilder).")
        .def(py::init<const std::string&, uint8_t>(), py::arg("bin_path"), py::arg("dtype_code"))
        .def(
            "add_item",
            [](IndexWriter& w, const py::array& tokens) {
                w.add_sequence(tokens.data(), static_cast<size_t>(tokens.size()), source_type_of(tokens));
            },
            py::arg("tokens"))
        .def(
            "add_document",
            [](IndexWriter& w, const py::array& tokens,
               const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths) {
                w.add_document(tokens.data(), static_cast<size_t>(tokens.size()), source_type_of(tokens),
                               lengths.data(), static_cast<size_t>(lengths.size()));
            },
            py::arg("tokens"), py::arg("lengths"))
        .def("end_document", &IndexWriter::end_document)
        .def("add_index", &IndexWriter::add_index, py::arg("idx_path"), py::arg("bin_path"))
        .def("finalize", &IndexWriter::finalize, py::arg("idx_path"))
        .def("abort", &IndexWriter::abort)
        .def_property_readonly("dtype_code", &IndexWriter::dtype_code)
        .def_property_readonly("num_sequences", &IndexWriter::num_sequences)
        .def_property_readonly("num_documents", &IndexWriter::num_documents)
        .def_property_readonly("num_tokens", &IndexWriter::num_tokens)
        .def_property_readonly("finalized", &IndexWriter::finalized);
}
