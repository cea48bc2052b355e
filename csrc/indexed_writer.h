// Streaming MMIDIDX writer. Tokens go to a temporary file beside the .bin; sequence lengths and
// document indices are spilled to anonymous (already unlinked) temporary files, so memory stays
// flat however many documents are written and a killed process leaves no side files behind.
// finalize() writes the .idx to a temporary file, fsyncs both, then renames them into place: a
// complete .idx is the last thing to appear, and an abandoned writer leaves no .idx at all.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "indexed_common.h"

namespace ltu {

// Write-only file descriptor with a user-space buffer (and read-back for the spill files).
class BufferedFd {
public:
    BufferedFd() = default;
    ~BufferedFd();
    BufferedFd(const BufferedFd&) = delete;
    BufferedFd& operator=(const BufferedFd&) = delete;

    void open_new(const std::string& path);             // O_CREAT | O_EXCL, honours umask
    void open_anonymous(const std::string& directory);  // created then unlinked at once
    void write(const void* data, size_t n);
    void flush();
    void sync();                                        // flush + fsync
    void rewind_for_reading();                          // flush, then read from the start
    size_t read(void* data, size_t n);                  // short only at end of file
    void close();
    bool is_open() const { return fd_ >= 0; }
    const std::string& path() const { return path_; }

private:
    int fd_ = -1;
    std::string path_;
    std::vector<char> buffer_;
    size_t used_ = 0;
};

// Source element types accepted by add_tokens (numpy kind + itemsize, native byte order).
enum class SourceType { kI8, kI16, kI32, kI64, kU8, kU16, kU32, kU64, kF32, kF64 };

class IndexWriter {
public:
    IndexWriter(const std::string& bin_path, uint8_t dtype_code);
    ~IndexWriter();  // aborts if not finalized

    // Appends the tokens of one or more sequences. Every value is checked to be exactly
    // representable in the dataset dtype before anything is written.
    void add_sequence(const void* tokens, size_t count, SourceType type);
    void add_document(const void* tokens, size_t count, SourceType type, const int64_t* lengths,
                      size_t num_lengths);
    void end_document();
    void add_index(const std::string& idx_path, const std::string& bin_path);
    void finalize(const std::string& idx_path);
    void abort();  // removes the temporary .bin; no .idx is written

    uint8_t dtype_code() const { return dtype_code_; }
    uint64_t num_sequences() const { return num_sequences_; }
    uint64_t num_documents() const { return num_doc_indices_ - 1; }
    uint64_t num_tokens() const { return total_bytes_ / itemsize_; }
    bool finalized() const { return finalized_; }

private:
    void require_open(const char* what) const;
    void write_tokens(const void* tokens, size_t count, SourceType type);
    void append_length(uint64_t length);

    std::string bin_path_;
    std::string bin_tmp_path_;
    std::string idx_tmp_path_;
    uint8_t dtype_code_;
    size_t itemsize_;
    BufferedFd bin_;
    BufferedFd lengths_;      // int32 per sequence
    BufferedFd doc_indices_;  // int64 per document boundary (starts with 0)
    uint64_t num_sequences_ = 0;
    uint64_t num_doc_indices_ = 0;
    uint64_t open_sequences_ = 0;  // sequences since the last end_document()
    uint64_t total_bytes_ = 0;
    bool finalized_ = false;
    bool aborted_ = false;
};

}  // namespace ltu
