// MMIDIDX reader: maps <prefix>.idx and <prefix>.bin and validates them completely before use, so
// that every later access is in bounds by construction.
#include "indexed_reader.h"

#include <cerrno>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <limits>

namespace ltu {

bool dtype_code_known(uint64_t code) { return code >= kUInt8 && code <= kUInt16; }

size_t dtype_itemsize(uint8_t code) {
    switch (code) {
        case kUInt8: case kInt8: return 1;
        case kInt16: case kUInt16: return 2;
        case kInt32: case kFloat32: return 4;
        case kInt64: case kFloat64: return 8;
        default: throw FormatError("unknown token dtype code " + std::to_string(code));
    }
}

const char* dtype_name(uint8_t code) {
    switch (code) {
        case kUInt8: return "uint8";
        case kInt8: return "int8";
        case kInt16: return "int16";
        case kInt32: return "int32";
        case kInt64: return "int64";
        case kFloat64: return "float64";
        case kFloat32: return "float32";
        case kUInt16: return "uint16";
        default: throw FormatError("unknown token dtype code " + std::to_string(code));
    }
}

void throw_errno(const std::string& path, const std::string& action) {
    int err = errno;
    throw SystemError(err, path, "cannot " + action + ": " + std::strerror(err));
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_errno(path, "open");
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        int err = errno;
        ::close(fd);
        errno = err;
        throw_errno(path, "stat");
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw FormatError(path + ": not a regular file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            int err = errno;
            ::close(fd);
            errno = err;
            throw_errno(path, "memory-map");
        }
        data_ = static_cast<const uint8_t*>(p);
        mapped_ = true;
    } else {
        // Views of zero tokens still need a valid, non-null address.
        static const uint8_t kEmpty[8] = {};
        data_ = kEmpty;
    }
    ::close(fd);  // the mapping stays valid without the descriptor
}

MappedFile::~MappedFile() {
    if (mapped_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

IndexReader::IndexReader(const std::string& idx_path, const std::string& bin_path)
    : idx_(std::make_shared<MappedFile>(idx_path)), bin_(std::make_shared<MappedFile>(bin_path)) {
    validate_header();
    validate_arrays();
}

void IndexReader::fail_idx(const std::string& problem) const {
    throw FormatError(idx_->path() + ": " + problem);
}

void IndexReader::validate_header() {
    const uint8_t* p = idx_->data();
    const size_t size = idx_->size();
    if (size < kHeaderSize)
        fail_idx("file has " + std::to_string(size) + " bytes, shorter than the " +
                 std::to_string(kHeaderSize) + "-byte MMIDIDX header");
    if (std::memcmp(p, kMagic, sizeof(kMagic)) != 0)
        fail_idx("wrong magic (not an MMIDIDX index file)");
    const uint64_t version = load_unaligned<uint64_t>(p + kOffVersion);
    if (version != kVersion)
        fail_idx("unsupported version " + std::to_string(version) + " (expected 1)");
    dtype_code_ = p[kOffDtype];
    if (!dtype_code_known(dtype_code_))
        fail_idx("unknown token dtype code " + std::to_string(dtype_code_) + " (known: 1..8)");
    itemsize_ = dtype_itemsize(dtype_code_);

    num_sequences_ = load_unaligned<uint64_t>(p + kOffNumSequences);
    num_doc_indices_ = load_unaligned<uint64_t>(p + kOffNumDocIndices);
    // Compare by division first so that hostile counts cannot overflow the size arithmetic.
    const uint64_t body = size - kHeaderSize;
    if (num_sequences_ > body / 12)
        fail_idx("header says " + std::to_string(num_sequences_) +
                 " sequences, more than a file of " + std::to_string(size) + " bytes can hold");
    const uint64_t after_seq = body - 12 * num_sequences_;
    if (num_doc_indices_ > after_seq / 8)
        fail_idx("header says " + std::to_string(num_doc_indices_) +
                 " document indices, more than a file of " + std::to_string(size) + " bytes can hold");
    if (num_doc_indices_ == 0)
        fail_idx("header says 0 document indices (at least the leading 0 is required)");
    const uint64_t expected = kHeaderSize + 12 * num_sequences_ + 8 * num_doc_indices_;
    if (expected != size)
        fail_idx("file has " + std::to_string(size) + " bytes but its header implies " +
                 std::to_string(expected) + " (" + std::to_string(num_sequences_) + " sequences, " +
                 std::to_string(num_doc_indices_) + " document indices)");
    lengths_ = p + kHeaderSize;
    pointers_ = lengths_ + 4 * num_sequences_;
    doc_indices_ = pointers_ + 8 * num_sequences_;
}

void IndexReader::validate_arrays() {
    const uint64_t bin_size = bin_->size();
    // Running byte offset of the next sequence; bounded by bin_size at each step, so the sum of a
    // length (< 2^31) times itemsize (<= 8) never overflows.
    uint64_t expected = 0;
    for (uint64_t i = 0; i < num_sequences_; ++i) {
        const int32_t len = length(i);
        const int64_t ptr = pointer(i);
        if (len < 0)
            fail_idx("sequence " + std::to_string(i) + " has negative length " + std::to_string(len));
        if (ptr < 0 || static_cast<uint64_t>(ptr) != expected) {
            if (i == 0)
                fail_idx("first sequence pointer is " + std::to_string(ptr) + ", expected 0");
            fail_idx("sequence pointers are not contiguous: pointer[" + std::to_string(i) + "] = " +
                     std::to_string(ptr) + ", expected " + std::to_string(expected));
        }
        const uint64_t nbytes = static_cast<uint64_t>(len) * itemsize_;
        if (nbytes > bin_size - expected)
            fail_idx("sequence " + std::to_string(i) + " (byte offset " + std::to_string(ptr) + ", " +
                     std::to_string(len) + " tokens) ends past the end of " + bin_->path() + " (" +
                     std::to_string(bin_size) + " bytes)");
        expected += nbytes;
    }
    if (expected != bin_size)
        throw FormatError(bin_->path() + ": file has " + std::to_string(bin_size) +
                          " bytes but " + idx_->path() + " describes " + std::to_string(expected) +
                          " bytes of " + dtype_name(dtype_code_) + " tokens");

    const int64_t n = static_cast<int64_t>(num_sequences_);
    int64_t previous = doc_index(0);
    if (previous != 0)
        fail_idx("document indices start at " + std::to_string(previous) + ", expected 0");
    for (uint64_t j = 1; j < num_doc_indices_; ++j) {
        const int64_t d = doc_index(j);
        if (d < previous)
            fail_idx("document indices decrease: index[" + std::to_string(j) + "] = " +
                     std::to_string(d) + " after " + std::to_string(previous));
        previous = d;
    }
    if (previous != n)
        fail_idx("last document index is " + std::to_string(previous) + ", expected the number of sequences " +
                 std::to_string(n));
}

}  // namespace ltu
