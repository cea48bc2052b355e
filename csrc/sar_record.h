// The common path of reading a SAR record line in C++: parse the JSON, validate it, and serialize it
// to the texts before its reward labels, exactly as engine.data.sar.parse_json_line and
// serialize_parts do. Only well-formed records of JSON's plain types are taken; anything else (any
// validation failure, a repeated key, NaN, a lone surrogate, a number of more than 64 characters, a
// number that overflows or underflows, deep nesting) is declined, and the Python path reads that line with
// its own errors and semantics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ltu::sar {

// One record as serialize_parts gives it: text k is the text before reward label k.
struct SerializedRecord {
    std::string_view domain;                     // views into the parsed line
    uint32_t steps = 0;
    bool episode = false;
    std::string texts;                           // every text, concatenated
    std::vector<size_t> text_ends;               // end of text k in `texts`
    std::vector<std::string_view> reward_fields; // per reward (one per text)
    std::vector<double> reward_values;
};

// Backslash escapes of a state/action string value (sar.escape_value): \\ \n \r ; = and "<|".
void escape_value(std::string& out, std::string_view value);

// Text of a float state/action value (sar.format_value): an integer below 1e15 without a
// fraction, else "%.<digits>g". `value` must be finite.
void format_float(std::string& out, double value, int digits);

class RecordParser {
public:
    explicit RecordParser(int float_digits);

    // True when `line` (one JSON Lines record, its line ending allowed) was taken; `out` then holds
    // its texts and rewards. False: declined, for the Python path.
    bool parse(std::string_view line, SerializedRecord& out);

private:
    struct Field {
        std::string_view name;
        size_t begin, end;  // the value's text in values_
    };
    struct Reward {
        std::string_view name;
        double value;
    };
    struct StepFields {
        std::vector<Field> state, action;
        std::vector<Reward> reward;
        bool has_state = false, has_action = false, has_reward = false;
        void clear();
    };

    void skip_ws();
    bool consume(char c);
    bool at_end() const { return pos_ >= end_; }
    bool plain_string(std::string_view& out);
    bool decoded_string(std::string_view& out);
    bool string_value(std::string_view& out);
    bool number(std::string_view& token, bool& is_integer);
    bool literal(std::string_view word);
    bool skip_any(int depth);
    bool skip_string();
    bool parse_step_member(std::string_view key, StepFields& step);
    bool parse_fields(std::vector<Field>& fields);
    bool parse_rewards(std::vector<Reward>& rewards);
    bool parse_steps();
    void serialize(std::string_view domain, SerializedRecord& out) const;

    int float_digits_;
    const char* pos_ = nullptr;
    const char* end_ = nullptr;
    std::string values_;                  // state/action value texts of the record
    std::string decoded_;                 // a string value with escapes, decoded
    std::vector<StepFields> steps_;       // reused across records
    size_t num_steps_ = 0;
    std::vector<std::string_view> keys_;  // keys of the open objects of `meta` (repeat check)
};

}  // namespace ltu::sar
