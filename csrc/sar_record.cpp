// JSON parsing, validation and serialization of the common SAR record (see sar_record.h). Every
// check mirrors engine/data/sar.py; a line this parser takes must give what the Python path gives,
// and any line it is not sure of is declined rather than guessed.
#include "sar_record.h"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <system_error>

namespace ltu::sar {

namespace {

constexpr int kMaxDepth = 64;          // of `meta`; deeper values go to the Python path
constexpr size_t kMaxObjectKeys = 1024;  // beyond: the quadratic repeat check is left to Python
constexpr size_t kMaxNumberChars = 64;   // longer numbers (json's 4300-digit int limit) too

constexpr std::string_view kDomainMarker = "<|domain|>";
constexpr std::string_view kStateMarker = "<|state|>";
constexpr std::string_view kActionMarker = "<|action|>";
constexpr std::string_view kRewardMarker = "<|reward|>";
constexpr std::string_view kFieldSeparator = "; ";

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alpha(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

// sar._DOMAIN_RE: [A-Za-z0-9_][A-Za-z0-9_.\-/]*
bool valid_domain(std::string_view s) {
    if (s.empty() || !(is_alpha(s[0]) || is_digit(s[0]) || s[0] == '_')) return false;
    for (char c : s.substr(1))
        if (!(is_alpha(c) || is_digit(c) || c == '_' || c == '.' || c == '-' || c == '/')) return false;
    return true;
}

// sar._FIELD_RE: [A-Za-z_][A-Za-z0-9_.\-]*
bool valid_field_name(std::string_view s) {
    if (s.empty() || !(is_alpha(s[0]) || s[0] == '_')) return false;
    for (char c : s.substr(1))
        if (!(is_alpha(c) || is_digit(c) || c == '_' || c == '.' || c == '-')) return false;
    return true;
}

int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

// A finite double of a validated JSON number token, correctly rounded as Python's float(); false
// when it overflows, underflows or cannot be read.
bool to_double(std::string_view token, double& value) {
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
    auto result = std::from_chars(token.data(), token.data() + token.size(), value);
    if (result.ec != std::errc() || result.ptr != token.data() + token.size()) return false;
#else
    std::string copy(token);  // strtod needs a terminated string; numbers use '.' in the C locale
    char* stop = nullptr;
    errno = 0;
    value = std::strtod(copy.c_str(), &stop);
    if (errno != 0 || stop != copy.c_str() + copy.size()) return false;
#endif
    return std::isfinite(value);
}

void append_int(std::string& out, long long value) {
    char buf[24];
    auto result = std::to_chars(buf, buf + sizeof buf, value);
    out.append(buf, result.ptr);
}

}  // namespace

void escape_value(std::string& out, std::string_view value) {
    for (size_t i = 0; i < value.size(); ++i) {
        char c = value[i];
        switch (c) {
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case ';': out += "\\;"; break;
            case '=': out += "\\="; break;
            case '<':
                if (i + 1 < value.size() && value[i + 1] == '|') {
                    out += "<\\|";
                    ++i;
                } else {
                    out += c;
                }
                break;
            default: out += c;
        }
    }
}

void format_float(std::string& out, double value, int digits) {
    if (std::floor(value) == value && std::fabs(value) < 1e15) {
        append_int(out, static_cast<long long>(value));  // -0.0 reads "0", as str(int(-0.0))
        return;
    }
    char buf[160];
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
    auto result = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::general, digits);
    out.append(buf, result.ptr);
#else
    int n = std::snprintf(buf, sizeof buf, "%.*g", digits, value);
    out.append(buf, static_cast<size_t>(n));
#endif
}

void RecordParser::StepFields::clear() {
    state.clear();
    action.clear();
    reward.clear();
    has_state = has_action = has_reward = false;
}

RecordParser::RecordParser(int float_digits) : float_digits_(float_digits) {}

void RecordParser::skip_ws() {
    while (pos_ < end_ && (*pos_ == ' ' || *pos_ == '\t' || *pos_ == '\n' || *pos_ == '\r')) ++pos_;
}

bool RecordParser::consume(char c) {
    skip_ws();
    if (pos_ < end_ && *pos_ == c) {
        ++pos_;
        return true;
    }
    return false;
}

// A string without escapes (keys, names, most values); pos_ at its opening quote.
bool RecordParser::plain_string(std::string_view& out) {
    if (pos_ >= end_ || *pos_ != '"') return false;
    const char* start = ++pos_;
    for (; pos_ < end_; ++pos_) {
        unsigned char c = static_cast<unsigned char>(*pos_);
        if (c == '"') {
            out = std::string_view(start, static_cast<size_t>(pos_ - start));
            ++pos_;
            return true;
        }
        if (c == '\\' || c < 0x20) return false;  // json (strict) refuses raw control characters
    }
    return false;
}

// A string value with escapes, decoded into decoded_; lone surrogates are declined (json keeps
// them in the str, which the Python path then handles).
bool RecordParser::decoded_string(std::string_view& out) {
    decoded_.clear();
    ++pos_;  // the opening quote
    while (pos_ < end_) {
        unsigned char c = static_cast<unsigned char>(*pos_++);
        if (c == '"') {
            out = decoded_;
            return true;
        }
        if (c < 0x20) return false;
        if (c != '\\') {
            decoded_ += static_cast<char>(c);
            continue;
        }
        if (pos_ >= end_) return false;
        char e = *pos_++;
        switch (e) {
            case '"': decoded_ += '"'; break;
            case '\\': decoded_ += '\\'; break;
            case '/': decoded_ += '/'; break;
            case 'b': decoded_ += '\b'; break;
            case 'f': decoded_ += '\f'; break;
            case 'n': decoded_ += '\n'; break;
            case 'r': decoded_ += '\r'; break;
            case 't': decoded_ += '\t'; break;
            case 'u': {
                auto hex4 = [this](uint32_t& v) {
                    if (end_ - pos_ < 4) return false;
                    v = 0;
                    for (int k = 0; k < 4; ++k) {
                        int h = hex_value(pos_[k]);
                        if (h < 0) return false;
                        v = v * 16 + static_cast<uint32_t>(h);
                    }
                    pos_ += 4;
                    return true;
                };
                uint32_t cp;
                if (!hex4(cp)) return false;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return false;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t low;
                    if (end_ - pos_ < 2 || pos_[0] != '\\' || pos_[1] != 'u') return false;
                    pos_ += 2;
                    if (!hex4(low) || low < 0xDC00 || low > 0xDFFF) return false;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                }
                append_utf8(decoded_, cp);
                break;
            }
            default: return false;
        }
    }
    return false;
}

bool RecordParser::string_value(std::string_view& out) {
    const char* start = pos_;
    if (plain_string(out)) return true;
    pos_ = start;
    return pos_ < end_ && *pos_ == '"' && decoded_string(out);
}

// A JSON number token (json's grammar); is_integer when it has no fraction and no exponent.
bool RecordParser::number(std::string_view& token, bool& is_integer) {
    const char* start = pos_;
    if (pos_ < end_ && *pos_ == '-') ++pos_;
    if (pos_ >= end_) return false;
    if (*pos_ == '0') {
        ++pos_;
    } else if (*pos_ >= '1' && *pos_ <= '9') {
        while (pos_ < end_ && is_digit(*pos_)) ++pos_;
    } else {
        return false;
    }
    is_integer = true;
    if (pos_ < end_ && *pos_ == '.') {
        ++pos_;
        if (pos_ >= end_ || !is_digit(*pos_)) return false;
        while (pos_ < end_ && is_digit(*pos_)) ++pos_;
        is_integer = false;
    }
    if (pos_ < end_ && (*pos_ == 'e' || *pos_ == 'E')) {
        ++pos_;
        if (pos_ < end_ && (*pos_ == '+' || *pos_ == '-')) ++pos_;
        if (pos_ >= end_ || !is_digit(*pos_)) return false;
        while (pos_ < end_ && is_digit(*pos_)) ++pos_;
        is_integer = false;
    }
    token = std::string_view(start, static_cast<size_t>(pos_ - start));
    return token.size() <= kMaxNumberChars;
}

bool RecordParser::literal(std::string_view word) {
    if (static_cast<size_t>(end_ - pos_) < word.size() || std::string_view(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
}

bool RecordParser::skip_string() {
    ++pos_;  // the opening quote
    while (pos_ < end_) {
        unsigned char c = static_cast<unsigned char>(*pos_++);
        if (c == '"') return true;
        if (c < 0x20) return false;
        if (c != '\\') continue;
        if (pos_ >= end_) return false;
        char e = *pos_++;
        if (e == 'u') {
            if (end_ - pos_ < 4) return false;
            for (int k = 0; k < 4; ++k)
                if (hex_value(*pos_++) < 0) return false;
        } else if (std::string_view("\"\\/bfnrt").find(e) == std::string_view::npos) {
            return false;
        }
    }
    return false;
}

// Any JSON value (`meta`): checked, not kept. Objects may not repeat a key (json's hook refuses).
bool RecordParser::skip_any(int depth) {
    skip_ws();
    if (pos_ >= end_ || depth > kMaxDepth) return false;
    char c = *pos_;
    if (c == '"') return skip_string();
    if (c == '{') {
        ++pos_;
        if (consume('}')) return true;
        const size_t base = keys_.size();
        do {
            skip_ws();
            std::string_view key;
            if (!plain_string(key)) return false;  // keys with escapes: the Python path compares them
            if (keys_.size() - base >= kMaxObjectKeys) return false;
            for (size_t k = base; k < keys_.size(); ++k)
                if (keys_[k] == key) return false;
            keys_.push_back(key);
            if (!consume(':') || !skip_any(depth + 1)) return false;
        } while (consume(','));
        keys_.resize(base);
        return consume('}');
    }
    if (c == '[') {
        ++pos_;
        if (consume(']')) return true;
        do {
            if (!skip_any(depth + 1)) return false;
        } while (consume(','));
        return consume(']');
    }
    if (c == 't') return literal("true");
    if (c == 'f') return literal("false");
    if (c == 'n') return literal("null");
    std::string_view token;
    bool is_integer;
    return number(token, is_integer);  // NaN and Infinity are not JSON: declined
}

// State or action: an object of named scalars, their texts appended to values_ in order.
bool RecordParser::parse_fields(std::vector<Field>& fields) {
    if (!consume('{')) return false;
    if (consume('}')) return true;
    do {
        skip_ws();
        std::string_view name;
        if (!plain_string(name) || !valid_field_name(name)) return false;
        for (const Field& f : fields)
            if (f.name == name) return false;
        if (!consume(':')) return false;
        skip_ws();
        if (at_end()) return false;
        const size_t begin = values_.size();
        char c = *pos_;
        if (c == '"') {
            std::string_view text;
            if (!string_value(text)) return false;
            escape_value(values_, text);
        } else if (c == 't' || c == 'f' || c == 'n') {
            std::string_view word = c == 't' ? "true" : c == 'f' ? "false" : "null";
            if (!literal(word)) return false;
            values_ += word;
        } else {
            std::string_view token;
            bool is_integer;
            if (!number(token, is_integer)) return false;
            if (is_integer) {
                values_ += token == "-0" ? std::string_view("0") : token;  // str(int): JSON has no leading zeros
            } else {
                double value;
                if (!to_double(token, value)) return false;
                format_float(values_, value, float_digits_);
            }
        }
        fields.push_back(Field{name, begin, values_.size()});
    } while (consume(','));
    return consume('}');
}

// Reward: an object of named numbers or booleans (as floats), at least one.
bool RecordParser::parse_rewards(std::vector<Reward>& rewards) {
    if (!consume('{')) return false;
    do {
        skip_ws();
        std::string_view name;
        if (!plain_string(name) || !valid_field_name(name)) return false;
        for (const Reward& r : rewards)
            if (r.name == name) return false;
        if (!consume(':')) return false;
        skip_ws();
        if (at_end()) return false;
        double value;
        if (literal("true")) {
            value = 1.0;
        } else if (literal("false")) {
            value = 0.0;
        } else {
            std::string_view token;
            bool is_integer;
            if (!number(token, is_integer)) return false;
            // Integers too: the nearest double of the exact value, as Python's float(int), which
            // has no negative zero.
            if (!to_double(token, value)) return false;
            if (is_integer && value == 0.0) value = 0.0;
        }
        rewards.push_back(Reward{name, value});
    } while (consume(','));
    return consume('}');
}

bool RecordParser::parse_step_member(std::string_view key, StepFields& step) {
    if (key == "state") {
        if (step.has_state) return false;
        step.has_state = true;
        return parse_fields(step.state);
    }
    if (key == "action") {
        if (step.has_action) return false;
        step.has_action = true;
        return parse_fields(step.action);
    }
    if (key == "reward") {
        if (step.has_reward) return false;
        step.has_reward = true;
        return parse_rewards(step.reward);
    }
    return false;
}

// "steps": a non-empty list of objects with exactly state, action and reward.
bool RecordParser::parse_steps() {
    if (!consume('[')) return false;
    do {
        if (num_steps_ == steps_.size()) steps_.emplace_back();
        StepFields& step = steps_[num_steps_++];
        step.clear();
        if (!consume('{')) return false;
        do {
            skip_ws();
            std::string_view key;
            if (!plain_string(key) || !consume(':') || !parse_step_member(key, step)) return false;
        } while (consume(','));
        if (!consume('}') || !(step.has_state && step.has_action && step.has_reward)) return false;
    } while (consume(','));
    return consume(']');
}

bool RecordParser::parse(std::string_view line, SerializedRecord& out) {
    pos_ = line.data();
    end_ = line.data() + line.size();
    values_.clear();
    keys_.clear();
    if (steps_.empty()) steps_.emplace_back();
    steps_[0].clear();
    num_steps_ = 0;
    bool has_domain = false, has_steps = false, has_meta = false, has_step_keys = false;
    std::string_view domain;
    if (!consume('{')) return false;
    do {
        skip_ws();
        std::string_view key;
        if (!plain_string(key) || !consume(':')) return false;
        skip_ws();
        if (key == "domain") {
            if (has_domain || !plain_string(domain) || !valid_domain(domain)) return false;
            has_domain = true;
        } else if (key == "steps") {
            if (has_steps || has_step_keys || !parse_steps()) return false;  // one or the other
            has_steps = true;
        } else if (key == "meta") {
            if (has_meta || !skip_any(1)) return false;
            has_meta = true;
        } else {  // state / action / reward of a single decision, or an unknown key
            if (has_steps || !parse_step_member(key, steps_[0])) return false;
            has_step_keys = true;
        }
    } while (consume(','));
    if (!consume('}')) return false;
    skip_ws();
    if (!at_end() || !has_domain) return false;
    if (!has_steps) {
        const StepFields& single = steps_[0];
        if (!(single.has_state && single.has_action && single.has_reward)) return false;
        num_steps_ = 1;
    }
    for (size_t s = 0; s < num_steps_; ++s)
        if (steps_[s].reward.empty()) return false;
    out.domain = domain;
    out.steps = static_cast<uint32_t>(num_steps_);
    out.episode = has_steps;
    serialize(domain, out);
    return true;
}

// serialize_parts: per step "<|state|>f=v; ...<|action|>...<|reward|>", then per reward its name
// and "=", the text before its label; the next reward's text starts with "; ".
void RecordParser::serialize(std::string_view domain, SerializedRecord& out) const {
    out.texts.clear();
    out.text_ends.clear();
    out.reward_fields.clear();
    out.reward_values.clear();
    auto append_fields = [&](const std::vector<Field>& fields) {
        for (size_t k = 0; k < fields.size(); ++k) {
            if (k) out.texts += kFieldSeparator;
            out.texts += fields[k].name;
            out.texts += '=';
            out.texts.append(values_, fields[k].begin, fields[k].end - fields[k].begin);
        }
    };
    out.texts += kDomainMarker;
    out.texts += domain;
    for (size_t s = 0; s < num_steps_; ++s) {
        const StepFields& step = steps_[s];
        out.texts += kStateMarker;
        append_fields(step.state);
        out.texts += kActionMarker;
        append_fields(step.action);
        out.texts += kRewardMarker;
        for (size_t r = 0; r < step.reward.size(); ++r) {
            if (r) out.texts += kFieldSeparator;
            out.texts += step.reward[r].name;
            out.texts += '=';
            out.text_ends.push_back(out.texts.size());
            out.reward_fields.push_back(step.reward[r].name);
            out.reward_values.push_back(step.reward[r].value);
        }
    }
}

}  // namespace ltu::sar
