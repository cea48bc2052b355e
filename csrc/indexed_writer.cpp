// Streaming MMIDIDX writer (see indexed_writer.h for the durability rules).
#include "indexed_writer.h"

#include <cerrno>
#include <cmath>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
#include <random>
#include <type_traits>

#include "indexed_reader.h"

namespace ltu {
namespace {

constexpr size_t kBufferBytes = size_t(1) << 20;
constexpr size_t kConvertChunk = size_t(1) << 16;  // elements converted per staging pass

std::string directory_of(const std::string& path) {
    const auto slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    if (slash == 0) return "/";
    return path.substr(0, slash);
}

// Creates a new file under a fresh temporary name next to `path` (another name on a clash) and
// returns that name, so that only a file this writer created is ever renamed or removed.
std::string open_temp_for(BufferedFd& file, const std::string& path) {
    std::random_device rd;
    for (int attempt = 0;; ++attempt) {
        std::string name =
            path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(rd() % 1000000000u);
        try {
            file.open_new(name);
            return name;
        } catch (const SystemError& e) {
            if (e.err != EEXIST || attempt > 16) throw;
        }
    }
}

void fsync_directory(const std::string& dir) {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;  // best effort: some file systems refuse directory descriptors
    ::fsync(fd);
    ::close(fd);
}

// True when v converts to Dst and back without change (integral, in range, finite as needed).
template <typename Dst, typename Src>
bool representable(Src v) {
    if constexpr (std::is_integral_v<Dst>) {
        if constexpr (std::is_integral_v<Src>) {
            const __int128 w = v;
            return w >= static_cast<__int128>(std::numeric_limits<Dst>::min()) &&
                   w <= static_cast<__int128>(std::numeric_limits<Dst>::max());
        } else {
            if (!std::isfinite(v) || v != std::trunc(v)) return false;
            // min is 0 or -2^k and max is 2^k - 1: both bounds are exact in double.
            const double lo = static_cast<double>(std::numeric_limits<Dst>::min());
            const double hi_exclusive = std::ldexp(1.0, std::numeric_limits<Dst>::digits);
            const double d = static_cast<double>(v);
            return d >= lo && d < hi_exclusive;
        }
    } else {
        if constexpr (std::is_integral_v<Src>) {
            // Integers convert to floats without overflow; check the rounding is exact.
            const Dst c = static_cast<Dst>(v);
            return static_cast<long double>(c) == static_cast<long double>(v);
        } else {
            if (std::isnan(v)) return false;
            if (std::isfinite(v) && std::fabs(static_cast<double>(v)) >
                                        static_cast<double>(std::numeric_limits<Dst>::max()))
                return false;
            return static_cast<Src>(static_cast<Dst>(v)) == v || std::isinf(v);
        }
    }
}

template <typename Src>
std::string value_text(Src v) {
    if constexpr (std::is_integral_v<Src>) {
        return std::to_string(v);
    } else {
        char buf[64];
        std::snprintf(buf, sizeof(buf), "%.17g", static_cast<double>(v));
        return buf;
    }
}

template <typename Dst>
std::string range_text() {
    if constexpr (std::is_integral_v<Dst>) {
        return " (range " + std::to_string(std::numeric_limits<Dst>::min()) + ".." +
               std::to_string(std::numeric_limits<Dst>::max()) + ")";
    } else {
        return " (not exactly representable)";
    }
}

template <typename Dst, typename Src>
void check_and_write(BufferedFd& out, const Src* src, size_t count, uint8_t code) {
    if constexpr (std::is_same_v<Dst, Src>) {
        out.write(src, count * sizeof(Dst));  // same type: nothing can be out of range
    } else {
        for (size_t i = 0; i < count; ++i) {
            if (!representable<Dst>(src[i]))
                throw std::invalid_argument("token id " + value_text(src[i]) + " at position " +
                                            std::to_string(i) + " does not fit the dataset dtype " +
                                            dtype_name(code) + range_text<Dst>());
        }
        std::vector<Dst> staging(std::min(kConvertChunk, count));
        for (size_t start = 0; start < count; start += kConvertChunk) {
            const size_t n = std::min(kConvertChunk, count - start);
            for (size_t i = 0; i < n; ++i) staging[i] = static_cast<Dst>(src[start + i]);
            out.write(staging.data(), n * sizeof(Dst));
        }
    }
}

template <typename Src>
void dispatch_dst(BufferedFd& out, const Src* src, size_t count, uint8_t code) {
    switch (code) {
        case kUInt8: return check_and_write<uint8_t>(out, src, count, code);
        case kInt8: return check_and_write<int8_t>(out, src, count, code);
        case kInt16: return check_and_write<int16_t>(out, src, count, code);
        case kInt32: return check_and_write<int32_t>(out, src, count, code);
        case kInt64: return check_and_write<int64_t>(out, src, count, code);
        case kFloat64: return check_and_write<double>(out, src, count, code);
        case kFloat32: return check_and_write<float>(out, src, count, code);
        case kUInt16: return check_and_write<uint16_t>(out, src, count, code);
        default: throw FormatError("unknown token dtype code " + std::to_string(code));
    }
}

}  // namespace

// ---------------------------------------------------------------- BufferedFd

BufferedFd::~BufferedFd() {
    if (fd_ >= 0) ::close(fd_);
}

void BufferedFd::open_new(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0) throw_errno(path, "create");
    path_ = path;
    buffer_.resize(kBufferBytes);
}

void BufferedFd::open_anonymous(const std::string& directory) {
    std::string tmpl = directory + "/.ltu-indexed-XXXXXX";
    fd_ = ::mkstemp(tmpl.data());
    if (fd_ < 0) throw_errno(tmpl, "create a temporary file like");
    ::unlink(tmpl.c_str());
    path_ = tmpl + " (unlinked)";
    buffer_.resize(kBufferBytes);
}

void BufferedFd::flush() {
    size_t done = 0;
    while (done < used_) {
        const ssize_t w = ::write(fd_, buffer_.data() + done, used_ - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            throw_errno(path_, "write");
        }
        done += static_cast<size_t>(w);
    }
    used_ = 0;
}

void BufferedFd::write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    if (used_ + n <= buffer_.size()) {
        std::memcpy(buffer_.data() + used_, p, n);
        used_ += n;
        return;
    }
    flush();
    if (n < buffer_.size()) {
        std::memcpy(buffer_.data(), p, n);
        used_ = n;
        return;
    }
    size_t done = 0;  // large writes bypass the buffer
    while (done < n) {
        const ssize_t w = ::write(fd_, p + done, n - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            throw_errno(path_, "write");
        }
        done += static_cast<size_t>(w);
    }
}

void BufferedFd::sync() {
    flush();
    if (::fsync(fd_) != 0) throw_errno(path_, "fsync");
}

void BufferedFd::rewind_for_reading() {
    flush();
    if (::lseek(fd_, 0, SEEK_SET) != 0) throw_errno(path_, "seek");
}

size_t BufferedFd::read(void* data, size_t n) {
    char* p = static_cast<char*>(data);
    size_t done = 0;
    while (done < n) {
        const ssize_t r = ::read(fd_, p + done, n - done);
        if (r < 0) {
            if (errno == EINTR) continue;
            throw_errno(path_, "read");
        }
        if (r == 0) break;
        done += static_cast<size_t>(r);
    }
    return done;
}

void BufferedFd::close() {
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
    buffer_.clear();
    buffer_.shrink_to_fit();
    used_ = 0;
}

// ---------------------------------------------------------------- IndexWriter

IndexWriter::IndexWriter(const std::string& bin_path, uint8_t dtype_code)
    : bin_path_(bin_path), dtype_code_(dtype_code) {
    if (!dtype_code_known(dtype_code))
        throw std::invalid_argument("unknown token dtype code " + std::to_string(dtype_code));
    itemsize_ = dtype_itemsize(dtype_code);
    const std::string dir = directory_of(bin_path);
    bin_tmp_path_ = open_temp_for(bin_, bin_path);
    try {
        lengths_.open_anonymous(dir);
        doc_indices_.open_anonymous(dir);
        const int64_t zero = 0;
        doc_indices_.write(&zero, sizeof(zero));
        num_doc_indices_ = 1;
    } catch (...) {
        abort();
        throw;
    }
}

IndexWriter::~IndexWriter() {
    if (!finalized_ && !aborted_) {
        try {
            abort();
        } catch (...) {
        }
    }
}

void IndexWriter::require_open(const char* what) const {
    if (finalized_) throw std::runtime_error(std::string(what) + ": the builder is already finalized");
    if (aborted_) throw std::runtime_error(std::string(what) + ": the builder was aborted");
}

void IndexWriter::write_tokens(const void* tokens, size_t count, SourceType type) {
    switch (type) {
        case SourceType::kI8: return dispatch_dst(bin_, static_cast<const int8_t*>(tokens), count, dtype_code_);
        case SourceType::kI16: return dispatch_dst(bin_, static_cast<const int16_t*>(tokens), count, dtype_code_);
        case SourceType::kI32: return dispatch_dst(bin_, static_cast<const int32_t*>(tokens), count, dtype_code_);
        case SourceType::kI64: return dispatch_dst(bin_, static_cast<const int64_t*>(tokens), count, dtype_code_);
        case SourceType::kU8: return dispatch_dst(bin_, static_cast<const uint8_t*>(tokens), count, dtype_code_);
        case SourceType::kU16: return dispatch_dst(bin_, static_cast<const uint16_t*>(tokens), count, dtype_code_);
        case SourceType::kU32: return dispatch_dst(bin_, static_cast<const uint32_t*>(tokens), count, dtype_code_);
        case SourceType::kU64: return dispatch_dst(bin_, static_cast<const uint64_t*>(tokens), count, dtype_code_);
        case SourceType::kF32: return dispatch_dst(bin_, static_cast<const float*>(tokens), count, dtype_code_);
        case SourceType::kF64: return dispatch_dst(bin_, static_cast<const double*>(tokens), count, dtype_code_);
    }
}

void IndexWriter::append_length(uint64_t length) {
    const int32_t len32 = static_cast<int32_t>(length);
    lengths_.write(&len32, sizeof(len32));
    total_bytes_ += length * itemsize_;
    ++num_sequences_;
    ++open_sequences_;
}

void IndexWriter::add_sequence(const void* tokens, size_t count, SourceType type) {
    require_open("add_item");
    if (count > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
        throw std::invalid_argument("a sequence of " + std::to_string(count) +
                                    " tokens is longer than the format's int32 length allows");
    write_tokens(tokens, count, type);  // throws before writing if any value does not fit
    append_length(count);
}

void IndexWriter::add_document(const void* tokens, size_t count, SourceType type,
                               const int64_t* lengths, size_t num_lengths) {
    require_open("add_document");
    uint64_t total = 0;
    for (size_t i = 0; i < num_lengths; ++i) {
        if (lengths[i] < 0 || lengths[i] > std::numeric_limits<int32_t>::max())
            throw std::invalid_argument("add_document: length " + std::to_string(lengths[i]) +
                                        " at position " + std::to_string(i) +
                                        " is not in 0..2147483647");
        total += static_cast<uint64_t>(lengths[i]);
    }
    if (total != count)
        throw std::invalid_argument("add_document: lengths sum to " + std::to_string(total) +
                                    " but " + std::to_string(count) + " tokens were given");
    write_tokens(tokens, count, type);
    for (size_t i = 0; i < num_lengths; ++i) append_length(static_cast<uint64_t>(lengths[i]));
    end_document();
}

void IndexWriter::end_document() {
    require_open("end_document");
    const int64_t end = static_cast<int64_t>(num_sequences_);
    doc_indices_.write(&end, sizeof(end));
    ++num_doc_indices_;
    open_sequences_ = 0;
}

void IndexWriter::add_index(const std::string& idx_path, const std::string& bin_path) {
    require_open("add_index");
    if (open_sequences_ != 0)
        throw std::runtime_error("add_index: " + std::to_string(open_sequences_) +
                                 " sequences added since the last end_document(); close the "
                                 "document before merging another dataset");
    const IndexReader other(idx_path, bin_path);
    if (other.dtype_code() != dtype_code_)
        throw std::invalid_argument("add_index: " + idx_path + " holds " +
                                    dtype_name(other.dtype_code()) + " tokens but this builder writes " +
                                    dtype_name(dtype_code_));
    const uint64_t n = other.num_sequences();
    lengths_.write(other.lengths_bytes(), 4 * n);  // little-endian int32, copied as bytes
    const int64_t offset = static_cast<int64_t>(num_sequences_);
    for (uint64_t j = 1; j < other.num_doc_indices(); ++j) {
        const int64_t shifted = offset + other.doc_index(j);
        doc_indices_.write(&shifted, sizeof(shifted));
    }
    bin_.write(other.bin()->data(), other.bin()->size());
    num_sequences_ += n;
    num_doc_indices_ += other.num_doc_indices() - 1;
    total_bytes_ += other.bin()->size();
}

void IndexWriter::finalize(const std::string& idx_path) {
    require_open("finalize");
    if (open_sequences_ != 0) end_document();  // trailing sequences form the last document
    try {
        bin_.sync();
        bin_.close();

        BufferedFd idx;
        idx_tmp_path_ = open_temp_for(idx, idx_path);
        uint8_t header[kHeaderSize];
        std::memcpy(header, kMagic, sizeof(kMagic));
        std::memcpy(header + kOffVersion, &kVersion, 8);
        header[kOffDtype] = dtype_code_;
        std::memcpy(header + kOffNumSequences, &num_sequences_, 8);
        std::memcpy(header + kOffNumDocIndices, &num_doc_indices_, 8);
        idx.write(header, sizeof(header));

        // Lengths verbatim, then the byte pointers they imply (a second pass over the same file).
        std::vector<int32_t> chunk(kConvertChunk);
        std::vector<int64_t> pointers(kConvertChunk);
        lengths_.rewind_for_reading();
        size_t got;
        while ((got = lengths_.read(chunk.data(), chunk.size() * 4)) > 0) idx.write(chunk.data(), got);
        lengths_.rewind_for_reading();
        int64_t next = 0;
        while ((got = lengths_.read(chunk.data(), chunk.size() * 4) / 4) > 0) {
            for (size_t i = 0; i < got; ++i) {
                pointers[i] = next;
                next += static_cast<int64_t>(chunk[i]) * static_cast<int64_t>(itemsize_);
            }
            idx.write(pointers.data(), got * 8);
        }
        doc_indices_.rewind_for_reading();
        while ((got = doc_indices_.read(pointers.data(), pointers.size() * 8)) > 0)
            idx.write(pointers.data(), got);
        idx.sync();
        idx.close();

        // Old .idx first, so no moment pairs an old index with the new tokens.
        if (::unlink(idx_path.c_str()) != 0 && errno != ENOENT) throw_errno(idx_path, "remove the old");
        if (::rename(bin_tmp_path_.c_str(), bin_path_.c_str()) != 0) throw_errno(bin_path_, "rename into");
        if (::rename(idx_tmp_path_.c_str(), idx_path.c_str()) != 0) throw_errno(idx_path, "rename into");
        fsync_directory(directory_of(idx_path));
        if (directory_of(idx_path) != directory_of(bin_path_)) fsync_directory(directory_of(bin_path_));
    } catch (...) {
        abort();
        throw;
    }
    lengths_.close();
    doc_indices_.close();
    finalized_ = true;
}

void IndexWriter::abort() {
    if (finalized_) return;
    aborted_ = true;
    bin_.close();
    lengths_.close();
    doc_indices_.close();
    if (!bin_tmp_path_.empty()) ::unlink(bin_tmp_path_.c_str());
    if (!idx_tmp_path_.empty()) ::unlink(idx_tmp_path_.c_str());
}

}  // namespace ltu
