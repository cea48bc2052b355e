// Shared pieces of the MMIDIDX reader and writer: the on-disk constants, the token dtype table,
// errors, unaligned loads and a read-only memory map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ltu {

// Header layout of <prefix>.idx (little-endian, no padding).
inline constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
inline constexpr uint64_t kVersion = 1;
inline constexpr size_t kOffVersion = 9;
inline constexpr size_t kOffDtype = 17;
inline constexpr size_t kOffNumSequences = 18;
inline constexpr size_t kOffNumDocIndices = 26;
inline constexpr size_t kHeaderSize = 34;

// Token dtype codes of the format.
enum DtypeCode : uint8_t {
    kUInt8 = 1,
    kInt8 = 2,
    kInt16 = 3,
    kInt32 = 4,
    kInt64 = 5,
    kFloat64 = 6,
    kFloat32 = 7,
    kUInt16 = 8,
};

bool dtype_code_known(uint64_t code);
size_t dtype_itemsize(uint8_t code);
const char* dtype_name(uint8_t code);  // numpy spelling: "uint16", ...

// A malformed or inconsistent dataset file (surfaces in Python as IndexedDatasetError, a ValueError).
struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A failed system call on a file (surfaces in Python as OSError / FileNotFoundError with errno).
struct SystemError : std::runtime_error {
    int err;
    std::string path;
    SystemError(int err_, std::string path_, const std::string& what)
        : std::runtime_error(what), err(err_), path(std::move(path_)) {}
};

[[noreturn]] void throw_errno(const std::string& path, const std::string& action);

// The .idx arrays start at byte 34, so every load goes through memcpy (never a cast pointer).
template <typename T>
inline T load_unaligned(const uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

// Read-only, whole-file memory map. Empty files are represented without a mapping.
class MappedFile {
public:
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;
    bool mapped_ = false;
};

}  // namespace ltu
