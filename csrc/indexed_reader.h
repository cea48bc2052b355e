// Validated, memory-mapped view of one MMIDIDX dataset (<prefix>.idx + <prefix>.bin).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "indexed_common.h"

namespace ltu {

class IndexReader {
public:
    // Maps both files and checks every header field and array against the file sizes; throws
    // FormatError (naming the file and the problem) or SystemError before anything can be read.
    IndexReader(const std::string& idx_path, const std::string& bin_path);

    uint8_t dtype_code() const { return dtype_code_; }
    size_t itemsize() const { return itemsize_; }
    uint64_t num_sequences() const { return num_sequences_; }
    uint64_t num_doc_indices() const { return num_doc_indices_; }
    uint64_t num_tokens() const { return bin_->size() / itemsize_; }

    // Entries of the three .idx arrays; i must be in range (callers check).
    int32_t length(uint64_t i) const { return load_unaligned<int32_t>(lengths_ + 4 * i); }
    int64_t pointer(uint64_t i) const { return load_unaligned<int64_t>(pointers_ + 8 * i); }
    int64_t doc_index(uint64_t i) const { return load_unaligned<int64_t>(doc_indices_ + 8 * i); }

    // Raw bytes of the arrays inside the .idx map, for bulk copies.
    const uint8_t* lengths_bytes() const { return lengths_; }
    const uint8_t* pointers_bytes() const { return pointers_; }
    const uint8_t* doc_indices_bytes() const { return doc_indices_; }

    const std::shared_ptr<MappedFile>& bin() const { return bin_; }
    const std::string& idx_path() const { return idx_->path(); }
    const std::string& bin_path() const { return bin_->path(); }

private:
    void validate_header();
    void validate_arrays();
    [[noreturn]] void fail_idx(const std::string& problem) const;

    std::shared_ptr<MappedFile> idx_;
    std::shared_ptr<MappedFile> bin_;
    uint8_t dtype_code_ = 0;
    size_t itemsize_ = 0;
    uint64_t num_sequences_ = 0;
    uint64_t num_doc_indices_ = 0;
    const uint8_t* lengths_ = nullptr;
    const uint8_t* pointers_ = nullptr;
    const uint8_t* doc_indices_ = nullptr;
};

}  // namespace ltu
