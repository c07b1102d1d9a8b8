//! Judging the receiver's answer to one delivery attempt: delivered,
//! rejected by the external system, worth retrying, or failed for good.
//!
//! The webhook contract asks the receiver to answer with a JSON object such
//! as `{"status": "1", "message": "…"}`, where `status` is a boolean spelled
//! `0` (error) or `1` (success). The HTTP status decides first:
//!
//! | HTTP status               | verdict                                   |
//! |---------------------------|-------------------------------------------|
//! | 2xx, body status success  | [`Verdict::Delivered`]                    |
//! | 2xx, body status error    | [`Verdict::Rejected`] (final)             |
//! | 2xx, body not as agreed   | [`Verdict::Permanent`] (invalid response) |
//! | 408, 425, 429, 500–599    | [`Verdict::Retry`], whatever the body     |
//! | 401, 403, 404             | [`Verdict::Misconfigured`] (a few tries)  |
//! | 3xx                       | [`Verdict::Permanent`] (never followed)   |
//! | other 4xx, 1xx, the rest  | [`Verdict::Permanent`]                    |
//!
//! Everything here is pure: the caller does the I/O and passes the clock in,
//! so every case can be tested with fixed inputs.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

/// What came back from one HTTP attempt, as far as judging it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer<'a> {
    pub status: u16,
    /// Raw Retry-After header value, if any.
    pub retry_after: Option<&'a str>,
    /// The body as read, at most the configured cap.
    pub body: &'a [u8],
    /// True when the body was longer than the cap and the rest was dropped.
    pub body_truncated: bool,
}

/// The judgement on one attempt.
///
/// `message` is what the receiver said (its `message`, else its `error`
/// field), trimmed and cut to [`MAX_MESSAGE_CHARS`]; `reason` is our own
/// short description of what was seen, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx and the body's status means success.
    Delivered { message: Option<String> },
    /// 2xx and the body's status means error: the external system refused
    /// the event, so sending it again would get the same answer.
    Rejected { message: Option<String> },
    /// A transient failure (408, 425, 429, 5xx): try again later, not before
    /// `retry_after` when the receiver gave one.
    Retry {
        reason: String,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The endpoint is set up wrong for now (401, 403: credentials; 404: the
    /// route): what a credentials rollover or a receiver's deploy looks like
    /// for a minute or two, so worth a few more tries, but not many
    /// ([`crate::policy::MISCONFIGURED_ATTEMPTS`]).
    Misconfigured {
        reason: String,
        message: Option<String>,
    },
    /// A failure that retrying cannot fix: 3xx, most 4xx, odd statuses, or a
    /// 2xx whose body breaks the contract.
    Permanent {
        reason: String,
        message: Option<String>,
    },
}

/// Largest message stored, in characters (not bytes): what the external system says is shown to users; 1,000 chars is plenty and bounds the row.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// Longest excerpt of a body quoted in a reason. 200 chars shows the start of
/// an HTML error page or a stack trace, enough to recognise it, while keeping
/// the reason a one-liner in logs and in the table.
const MAX_EXCERPT_CHARS: usize = 200;

/// Longest status value or Retry-After value quoted in a reason. A legitimate
/// one is under 30 chars (an HTTP-date is 29); 60 leaves room while a
/// receiver that sends a 10 kB object as `status` cannot bloat the reason.
const MAX_QUOTED_CHARS: usize = 60;

/// The UTF-8 encoding of U+FEFF. Receivers written in .NET tend to prefix
/// their JSON with it, and `serde_json` rejects it, so it is stripped first.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Judges one answer. `now` is the moment the answer arrived; it only serves
/// to turn a Retry-After HTTP-date into a delay.
#[must_use]
pub fn classify(answer: &Answer<'_>, now: SystemTime) -> Verdict {
    let code = answer.status;
    match code {
        200..=299 => judge_success_body(answer),
        // 408 (request timeout), 425 (too early), 429 (too many requests)
        // and every 5xx say "not now" rather than "never".
        408 | 425 | 429 | 500..=599 => retry(answer, now),
        // Following a redirect would send the signed payload somewhere the
        // operator did not configure, so a 3xx is a configuration problem.
        300..=399 => Verdict::Permanent {
            reason: format!("HTTP {code} (redirects are not followed)"),
            message: side_message(answer),
        },
        401 | 403 | 404 => Verdict::Misconfigured {
            reason: format!("HTTP {code}"),
            message: side_message(answer),
        },
        400..=499 => Verdict::Permanent {
            reason: format!("HTTP {code}"),
            message: side_message(answer),
        },
        // A 1xx should never reach us as a final answer (101 only follows an
        // upgrade we never ask for).
        100..=199 => Verdict::Permanent {
            reason: format!("HTTP {code} (unexpected informational status)"),
            message: side_message(answer),
        },
        // HTTP defines only 100-599 (RFC 9110, section 15).
        _ => Verdict::Permanent {
            reason: format!("HTTP {code} (not a status defined by HTTP)"),
            message: side_message(answer),
        },
    }
}

/// Cuts text to at most `max` chars on a char boundary, adding "…" when cut.
///
/// The result, "…" included, is at most `max` chars, so it fits a column
/// bounded at `max`. Chars are Unicode scalar values (what `str::chars`
/// yields and what PostgreSQL counts in `varchar(n)`), not grapheme clusters.
/// Whitespace left before the "…" is dropped. With `max == 0` a non-empty
/// text becomes empty, since not even the "…" fits.
#[must_use]
pub fn truncate_chars(text: &str, max: usize) -> String {
    if text.char_indices().nth(max).is_none() {
        // At most `max` chars: nothing to cut.
        return text.to_owned();
    }
    if max == 0 {
        return String::new();
    }
    // Keep `max - 1` chars and use the last slot for the ellipsis. The byte
    // index of char number `max - 1` exists since there are more than `max`.
    let cut = text.char_indices().nth(max - 1).map_or(0, |(at, _)| at);
    let mut out = text[..cut].trim_end().to_owned();
    out.push('…');
    out
}

/// A 2xx: the HTTP layer worked, so the body decides.
fn judge_success_body(answer: &Answer<'_>) -> Verdict {
    let code = answer.status;
    let invalid = |what: String, message: Option<String>| Verdict::Permanent {
        reason: format!("invalid response: HTTP {code} {what}"),
        message,
    };
    // A prefix of a JSON object never parses as the object it was cut from;
    // even when it happens to be valid JSON, it is not what was sent.
    if answer.body_truncated {
        return invalid("with a body over the size cap (truncated)".to_owned(), None);
    }
    let body = strip_bom(answer.body);
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return invalid(format!("with {}", describe_not_json(body)), None);
    };
    let Value::Object(object) = value else {
        return invalid(
            format!(
                "with a JSON {} instead of an object: {}",
                json_kind(&value),
                excerpt(body, MAX_EXCERPT_CHARS)
            ),
            None,
        );
    };
    let message = message_of(&object);
    match object.get("status") {
        None => invalid("without a \"status\" field".to_owned(), message),
        Some(status) => match status_means_success(status) {
            Some(true) => Verdict::Delivered { message },
            Some(false) => Verdict::Rejected { message },
            None => invalid(
                format!(
                    "with status {}",
                    truncate_chars(&status.to_string(), MAX_QUOTED_CHARS)
                ),
                message,
            ),
        },
    }
}

/// The contract's boolean: `Some(true)` for success, `Some(false)` for error,
/// `None` for anything else.
///
/// Only the exact spellings `"1"`, `1`, `true`, `"true"` and `"0"`, `0`,
/// `false`, `"false"` count. Matching is case-sensitive and nothing is
/// trimmed: `"TRUE"`, `" 1"`, `1.0`, `"yes"`, `2` or `null` are not in the
/// contract, and guessing what a receiver meant by them could mark an event
/// delivered that was not.
fn status_means_success(status: &Value) -> Option<bool> {
    match status {
        Value::Bool(success) => Some(*success),
        Value::String(text) => match text.as_str() {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        },
        // `as_u64` is `None` for floats (1.0) and negatives, so only the
        // integers 0 and 1 pass.
        Value::Number(number) => match number.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// A retryable status: the body does not change the verdict, but its message
/// and the Retry-After header are kept.
fn retry(answer: &Answer<'_>, now: SystemTime) -> Verdict {
    let code = answer.status;
    let (retry_after, note) = match answer.retry_after {
        None => (None, None),
        Some(raw) => match parse_retry_after(raw, now) {
            Some(delay) => (
                Some(delay),
                Some(format!("retry after {}s", whole_seconds_up(delay))),
            ),
            None => (
                None,
                Some(format!(
                    "Retry-After {:?} not understood",
                    excerpt(raw.as_bytes(), MAX_QUOTED_CHARS)
                )),
            ),
        },
    };
    let reason = match note {
        Some(note) => format!("HTTP {code} ({note})"),
        None => format!("HTTP {code}"),
    };
    Verdict::Retry {
        reason,
        message: side_message(answer),
        retry_after,
    }
}

/// Reads a Retry-After value (RFC 9110, section 10.2.3): delta-seconds or an
/// HTTP-date, as a delay from `now`. A date already past gives zero.
///
/// delta-seconds is digits only, so "-1", "+3" and "1.5" are refused rather
/// than read as something the receiver may not have meant. A number too
/// large for u64 (over 20 digits) is taken as `u64::MAX` seconds, since it
/// plainly means "a very long time"; the retry policy caps it anyway.
/// Surrounding whitespace is tolerated.
fn parse_retry_after(raw: &str, now: SystemTime) -> Option<Duration> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only, so parsing can fail only on overflow.
        let seconds = raw.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(raw).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Seconds for a reason, rounded up so that "retry after Ns" is never
/// earlier than the real delay (an HTTP-date minus a clock with nanoseconds
/// leaves a fraction).
fn whole_seconds_up(delay: Duration) -> u64 {
    let fraction = u64::from(delay.subsec_nanos() > 0);
    delay.as_secs().saturating_add(fraction)
}

/// The receiver's message from a body that does not decide the verdict
/// (non-2xx). A truncated or non-JSON body gives none.
fn side_message(answer: &Answer<'_>) -> Option<String> {
    if answer.body_truncated {
        return None;
    }
    match serde_json::from_slice::<Value>(strip_bom(answer.body)) {
        Ok(Value::Object(object)) => message_of(&object),
        _ => None,
    }
}

/// `message`, else `error` (how sibling webhooks report errors).
///
/// A `message` that is null, empty or only whitespace counts as absent, so
/// `{"message": "", "error": "bad card"}` yields "bad card": an empty field
/// tells the user nothing, the error does.
fn message_of(object: &Map<String, Value>) -> Option<String> {
    text_of(object.get("message")).or_else(|| text_of(object.get("error")))
}

/// One message field as stored text: a string trimmed, any other non-null
/// value as its compact JSON text, cut to [`MAX_MESSAGE_CHARS`].
fn text_of(value: Option<&Value>) -> Option<String> {
    let text = match value? {
        Value::Null => return None,
        Value::String(text) => text.trim().to_owned(),
        other => other.to_string(),
    };
    if text.is_empty() {
        return None;
    }
    // PostgreSQL text cannot hold U+0000 ("invalid byte sequence for encoding
    // UTF8: 0x00"), yet JSON can carry it as "\u0000". U+FFFD keeps a visible
    // trace without failing the UPDATE that records the attempt.
    let text = text.replace('\0', "\u{FFFD}");
    Some(truncate_chars(&text, MAX_MESSAGE_CHARS))
}

/// What a body that failed to parse looks like, for a reason.
fn describe_not_json(body: &[u8]) -> String {
    if body.is_empty() {
        return "an empty body".to_owned();
    }
    let seen = excerpt(body, MAX_EXCERPT_CHARS);
    if seen.is_empty() {
        // Only whitespace or control characters: nothing printable to quote.
        format!(
            "a blank body ({} bytes of whitespace or control characters)",
            body.len()
        )
    } else {
        format!("a body that is not JSON: {seen}")
    }
}

/// A one-line, printable excerpt of raw bytes: invalid UTF-8 becomes U+FFFD,
/// control characters become spaces, runs of whitespace become one space.
fn excerpt(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut line = String::with_capacity(text.len().min(max * 4));
    for word in text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
    {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
        // A char is at most 4 bytes, so past `max * 4` bytes the line holds
        // more than `max` chars: enough for truncate_chars to cut it, and no
        // need to copy the rest of a body that may be megabytes long.
        if line.len() > max.saturating_mul(4) {
            break;
        }
    }
    truncate_chars(&line, max)
}

fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(UTF8_BOM).unwrap_or(body)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// Wed, 21 Oct 2015 07:28:00 GMT: a fixed clock for HTTP-date cases.
    const NOW_SECS: u64 = 1_445_412_480;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn delivered(message: Option<&str>) -> Verdict {
        Verdict::Delivered {
            message: message.map(str::to_owned),
        }
    }

    fn rejected(message: Option<&str>) -> Verdict {
        Verdict::Rejected {
            message: message.map(str::to_owned),
        }
    }

    fn permanent(reason: &str, message: Option<&str>) -> Verdict {
        Verdict::Permanent {
            reason: reason.to_owned(),
            message: message.map(str::to_owned),
        }
    }

    fn misconfigured(reason: &str, message: Option<&str>) -> Verdict {
        Verdict::Misconfigured {
            reason: reason.to_owned(),
            message: message.map(str::to_owned),
        }
    }

    fn retry(reason: &str, message: Option<&str>, retry_after: Option<u64>) -> Verdict {
        Verdict::Retry {
            reason: reason.to_owned(),
            message: message.map(str::to_owned),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    struct Case {
        name: &'static str,
        status: u16,
        retry_after: Option<&'static str>,
        body: Vec<u8>,
        truncated: bool,
        want: Verdict,
    }

    fn case(name: &'static str, status: u16, body: impl AsRef<[u8]>, want: Verdict) -> Case {
        Case {
            name,
            status,
            retry_after: None,
            body: body.as_ref().to_vec(),
            truncated: false,
            want,
        }
    }

    impl Case {
        fn retry_after(mut self, value: &'static str) -> Self {
            self.retry_after = Some(value);
            self
        }

        fn truncated(mut self) -> Self {
            self.truncated = true;
            self
        }
    }

    #[test]
    fn classify_table() {
        let long_ascii = "x".repeat(1500);
        let long_ascii_cut = format!("{}…", "x".repeat(999));
        let long_multibyte = "é".repeat(1500);
        let long_multibyte_cut = format!("{}…", "é".repeat(999));
        let long_text_body = "word ".repeat(100);
        let long_text_cut = format!("{}…", "word ".repeat(40).trim_end());
        let deep_json = "[".repeat(1000);

        // One row per case; rustfmt would spread each over ten lines.
        #[rustfmt::skip]
        let cases = vec![
            // Every accepted status spelling.
            case("status \"1\"", 200, r#"{"status":"1","message":"ok"}"#, delivered(Some("ok"))),
            case("status 1", 200, r#"{"status":1}"#, delivered(None)),
            case("status true", 200, r#"{"status":true,"message":"done"}"#, delivered(Some("done"))),
            case("status \"true\"", 200, r#"{"status":"true"}"#, delivered(None)),
            case("status \"0\"", 200, r#"{"status":"0","message":"card declined"}"#, rejected(Some("card declined"))),
            case("status 0", 200, r#"{"status":0,"message":"no stock"}"#, rejected(Some("no stock"))),
            case("status false", 200, r#"{"status":false}"#, rejected(None)),
            case("status \"false\"", 200, r#"{"status":"false","message":"no"}"#, rejected(Some("no"))),
            // Spellings outside the contract.
            case("status \"2\"", 200, r#"{"status":"2"}"#, permanent(r#"invalid response: HTTP 200 with status "2""#, None)),
            case("status 2", 200, r#"{"status":2}"#, permanent("invalid response: HTTP 200 with status 2", None)),
            case("status \"yes\"", 200, r#"{"status":"yes","message":"m"}"#, permanent(r#"invalid response: HTTP 200 with status "yes""#, Some("m"))),
            case("status \"maybe\"", 200, r#"{"status":"maybe"}"#, permanent(r#"invalid response: HTTP 200 with status "maybe""#, None)),
            case("status null", 200, r#"{"status":null}"#, permanent("invalid response: HTTP 200 with status null", None)),
            case("status \"TRUE\"", 200, r#"{"status":"TRUE"}"#, permanent(r#"invalid response: HTTP 200 with status "TRUE""#, None)),
            case("status \"True\"", 200, r#"{"status":"True"}"#, permanent(r#"invalid response: HTTP 200 with status "True""#, None)),
            case("status \" 1\"", 200, r#"{"status":" 1"}"#, permanent(r#"invalid response: HTTP 200 with status " 1""#, None)),
            case("status \"\"", 200, r#"{"status":""}"#, permanent(r#"invalid response: HTTP 200 with status """#, None)),
            case("status 1.0", 200, r#"{"status":1.0}"#, permanent("invalid response: HTTP 200 with status 1.0", None)),
            case("status -0", 200, r#"{"status":-0}"#, permanent("invalid response: HTTP 200 with status -0.0", None)),
            case("status -1", 200, r#"{"status":-1}"#, permanent("invalid response: HTTP 200 with status -1", None)),
            case("status [1]", 200, r#"{"status":[1]}"#, permanent("invalid response: HTTP 200 with status [1]", None)),
            case("status object", 200, r#"{"status":{"ok":true}}"#, permanent(r#"invalid response: HTTP 200 with status {"ok":true}"#, None)),
            case("no status, message kept", 200, r#"{"message":"hello"}"#, permanent(r#"invalid response: HTTP 200 without a "status" field"#, Some("hello"))),
            case("empty object", 200, "{}", permanent(r#"invalid response: HTTP 200 without a "status" field"#, None)),
            case("status key in other case", 200, r#"{"Status":"1"}"#, permanent(r#"invalid response: HTTP 200 without a "status" field"#, None)),
            // message / error precedence and shapes.
            case("error when no message", 200, r#"{"status":"0","error":"bad signature"}"#, rejected(Some("bad signature"))),
            case("message over error", 200, r#"{"status":"0","message":"m","error":"e"}"#, rejected(Some("m"))),
            case("blank message falls back to error", 200, r#"{"status":"0","message":"  ","error":"e"}"#, rejected(Some("e"))),
            case("null message falls back to error", 200, r#"{"status":"0","message":null,"error":"e"}"#, rejected(Some("e"))),
            case("empty message, no error", 200, r#"{"status":"1","message":""}"#, delivered(None)),
            case("message trimmed", 200, r#"{"status":"1","message":"  padded \n"}"#, delivered(Some("padded"))),
            case("number message as JSON text", 200, r#"{"status":"1","message":42}"#, delivered(Some("42"))),
            case("object error as JSON text", 200, r#"{"status":"0","error":{"code":7, "text":"x"}}"#, rejected(Some(r#"{"code":7,"text":"x"}"#))),
            case("NUL in message replaced", 200, r#"{"status":"1","message":"a\u0000b"}"#, delivered(Some("a\u{FFFD}b"))),
            case("huge message cut", 200, format!(r#"{{"status":"1","message":"{long_ascii}"}}"#), delivered(Some(&long_ascii_cut))),
            case("huge multibyte message cut", 200, format!(r#"{{"status":"0","message":"{long_multibyte}"}}"#), rejected(Some(&long_multibyte_cut))),
            // Other 2xx and bodies that break the contract.
            case("201 delivered", 201, r#"{"status":1,"message":"created"}"#, delivered(Some("created"))),
            case("202 rejected", 202, r#"{"status":"0"}"#, rejected(None)),
            case("204 empty", 204, "", permanent("invalid response: HTTP 204 with an empty body", None)),
            case("200 empty", 200, "", permanent("invalid response: HTTP 200 with an empty body", None)),
            case("200 blank", 200, " \r\n\t", permanent("invalid response: HTTP 200 with a blank body (4 bytes of whitespace or control characters)", None)),
            case("200 plain text", 200, "OK", permanent("invalid response: HTTP 200 with a body that is not JSON: OK", None)),
            case("200 html collapsed", 200, "<html>\n  <body>Hello</body>\n</html>\n", permanent("invalid response: HTTP 200 with a body that is not JSON: <html> <body>Hello</body> </html>", None)),
            case("200 control chars", 200, "a\0b\x1bc\td", permanent("invalid response: HTTP 200 with a body that is not JSON: a b c d", None)),
            case("200 long text excerpt", 200, &long_text_body, permanent(&format!("invalid response: HTTP 200 with a body that is not JSON: {long_text_cut}"), None)),
            case("200 non-UTF-8", 200, b"\xff\xfe ok \xc3", permanent("invalid response: HTTP 200 with a body that is not JSON: \u{FFFD}\u{FFFD} ok \u{FFFD}", None)),
            case("200 non-UTF-8 inside a JSON string", 200, b"{\"status\":\"1\",\"message\":\"\xff\"}", permanent("invalid response: HTTP 200 with a body that is not JSON: {\"status\":\"1\",\"message\":\"\u{FFFD}\"}", None)),
            case("200 trailing garbage", 200, r#"{"status":"1"} x"#, permanent(r#"invalid response: HTTP 200 with a body that is not JSON: {"status":"1"} x"#, None)),
            case("200 nesting too deep", 200, &deep_json, permanent(&format!("invalid response: HTTP 200 with a body that is not JSON: {}…", "[".repeat(199)), None)),
            case("200 JSON array", 200, r#"[{"status":"1"}]"#, permanent(r#"invalid response: HTTP 200 with a JSON array instead of an object: [{"status":"1"}]"#, None)),
            case("200 JSON string", 200, r#""1""#, permanent(r#"invalid response: HTTP 200 with a JSON string instead of an object: "1""#, None)),
            case("200 JSON number", 200, "1", permanent("invalid response: HTTP 200 with a JSON number instead of an object: 1", None)),
            case("200 JSON null", 200, "null", permanent("invalid response: HTTP 200 with a JSON null instead of an object: null", None)),
            case("200 BOM stripped", 200, b"\xEF\xBB\xBF{\"status\":\"1\",\"message\":\"ok\"}", delivered(Some("ok"))),
            case("200 BOM only", 200, b"\xEF\xBB\xBF", permanent("invalid response: HTTP 200 with an empty body", None)),
            case("200 truncated though the prefix parses", 200, r#"{"status":"1"}"#, permanent("invalid response: HTTP 200 with a body over the size cap (truncated)", None)).truncated(),
            case("200 truncated", 200, r#"{"status":"1","message":"lo"#, permanent("invalid response: HTTP 200 with a body over the size cap (truncated)", None)).truncated(),
            case("2xx ignores Retry-After", 200, r#"{"status":"1"}"#, delivered(None)).retry_after("30"),
            // 3xx: never followed, whatever the body or headers say.
            case("301", 301, "", permanent("HTTP 301 (redirects are not followed)", None)),
            case("302 with JSON message", 302, r#"{"message":"moved"}"#, permanent("HTTP 302 (redirects are not followed)", Some("moved"))),
            case("304", 304, "", permanent("HTTP 304 (redirects are not followed)", None)),
            case("307 ignores Retry-After", 307, "", permanent("HTTP 307 (redirects are not followed)", None)).retry_after("5"),
            case("308 with a success body", 308, r#"{"status":"1"}"#, permanent("HTTP 308 (redirects are not followed)", None)),
            // Permanent 4xx.
            case("400 with error", 400, r#"{"status":"0","error":"missing field id"}"#, permanent("HTTP 400", Some("missing field id"))),
            case("401 empty", 401, "", misconfigured("HTTP 401", None)),
            case("403 with a success body", 403, r#"{"status":"1","message":"forbidden"}"#, misconfigured("HTTP 403", Some("forbidden"))),
            case("404 html", 404, "<h1>Not Found</h1>", misconfigured("HTTP 404", None)),
            case("409", 409, r#"{"message":"duplicate"}"#, permanent("HTTP 409", Some("duplicate"))),
            case("410", 410, "", permanent("HTTP 410", None)),
            case("422 with message", 422, r#"{"message":"bad amount"}"#, permanent("HTTP 422", Some("bad amount"))),
            case("422 with BOM", 422, b"\xEF\xBB\xBF{\"error\":\"bad\"}", permanent("HTTP 422", Some("bad"))),
            case("400 truncated JSON", 400, r#"{"message":"x"}"#, permanent("HTTP 400", None)).truncated(),
            case("400 JSON array", 400, r#"["x"]"#, permanent("HTTP 400", None)),
            case("499", 499, "", permanent("HTTP 499", None)),
            // Retryable, whatever the body says.
            case("408", 408, "", retry("HTTP 408", None, None)),
            case("425", 425, "", retry("HTTP 425", None, None)),
            case("429 Retry-After seconds", 429, "", retry("HTTP 429 (retry after 2s)", None, Some(2))).retry_after("2"),
            case("429 Retry-After 0", 429, "", retry("HTTP 429 (retry after 0s)", None, Some(0))).retry_after("0"),
            case("429 Retry-After padded", 429, "", retry("HTTP 429 (retry after 7s)", None, Some(7))).retry_after(" 7 "),
            case("500 with a success body", 500, r#"{"status":"1","message":"oops"}"#, retry("HTTP 500", Some("oops"), None)),
            case("500 truncated JSON", 500, r#"{"message":"oops"}"#, retry("HTTP 500", None, None)).truncated(),
            case("502 html", 502, "<html>Bad Gateway</html>", retry("HTTP 502", None, None)),
            case("503 HTTP-date in the future", 503, "", retry("HTTP 503 (retry after 120s)", None, Some(120))).retry_after("Wed, 21 Oct 2015 07:30:00 GMT"),
            case("503 HTTP-date now", 503, "", retry("HTTP 503 (retry after 0s)", None, Some(0))).retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            case("503 HTTP-date in the past", 503, "", retry("HTTP 503 (retry after 0s)", None, Some(0))).retry_after("Wed, 21 Oct 2015 07:00:00 GMT"),
            case("503 RFC 850 date", 503, "", retry("HTTP 503 (retry after 60s)", None, Some(60))).retry_after("Wednesday, 21-Oct-15 07:29:00 GMT"),
            case("503 asctime date", 503, "", retry("HTTP 503 (retry after 3600s)", None, Some(3600))).retry_after("Wed Oct 21 08:28:00 2015"),
            case("503 date with wrong weekday", 503, "", retry(r#"HTTP 503 (Retry-After "Thu, 21 Oct 2015 07:30:00 GMT" not understood)"#, None, None)).retry_after("Thu, 21 Oct 2015 07:30:00 GMT"),
            case("503 garbage", 503, "", retry(r#"HTTP 503 (Retry-After "soon" not understood)"#, None, None)).retry_after("soon"),
            case("503 negative", 503, "", retry(r#"HTTP 503 (Retry-After "-1" not understood)"#, None, None)).retry_after("-1"),
            case("503 fraction", 503, "", retry(r#"HTTP 503 (Retry-After "1.5" not understood)"#, None, None)).retry_after("1.5"),
            case("503 plus sign", 503, "", retry(r#"HTTP 503 (Retry-After "+3" not understood)"#, None, None)).retry_after("+3"),
            case("503 empty", 503, "", retry(r#"HTTP 503 (Retry-After "" not understood)"#, None, None)).retry_after(""),
            case("503 huge number saturates", 503, "", retry("HTTP 503 (retry after 18446744073709551615s)", None, Some(u64::MAX))).retry_after("99999999999999999999999"),
            case("503 with error", 503, r#"{"status":"0","error":"maintenance"}"#, retry("HTTP 503 (retry after 60s)", Some("maintenance"), Some(60))).retry_after("60"),
            case("504", 504, "", retry("HTTP 504", None, None)),
            case("599", 599, "", retry("HTTP 599", None, None)),
            // Odd statuses.
            case("100", 100, "", permanent("HTTP 100 (unexpected informational status)", None)),
            case("101", 101, "", permanent("HTTP 101 (unexpected informational status)", None)),
            case("600", 600, r#"{"message":"?"}"#, permanent("HTTP 600 (not a status defined by HTTP)", Some("?"))),
            case("0", 0, "", permanent("HTTP 0 (not a status defined by HTTP)", None)),
            case("999 ignores Retry-After", 999, "", permanent("HTTP 999 (not a status defined by HTTP)", None)).retry_after("5"),
        ];
        assert!(cases.len() >= 30, "the brief asks for at least 30 cases");

        let mut failures = Vec::new();
        for c in &cases {
            let answer = Answer {
                status: c.status,
                retry_after: c.retry_after,
                body: &c.body,
                body_truncated: c.truncated,
            };
            let got = classify(&answer, now());
            if got != c.want {
                failures.push(format!(
                    "{}:\n     got: {got:?}\n    want: {:?}",
                    c.name, c.want
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn retry_after_date_rounds_the_reason_up_but_keeps_the_exact_delay() {
        // Half a second past 07:28:00, the 07:30:00 date is 119.5s away.
        let now = now() + Duration::from_millis(500);
        let answer = Answer {
            status: 503,
            retry_after: Some("Wed, 21 Oct 2015 07:30:00 GMT"),
            body: b"",
            body_truncated: false,
        };
        assert_eq!(
            classify(&answer, now),
            Verdict::Retry {
                reason: "HTTP 503 (retry after 120s)".to_owned(),
                message: None,
                retry_after: Some(Duration::from_millis(119_500)),
            }
        );
    }

    #[test]
    fn every_status_code_is_judged_without_panicking() {
        // Arbitrary bytes, a truncated flag and a garbage header on every u16.
        for status in 0..=u16::MAX {
            let answer = Answer {
                status,
                retry_after: Some("\u{7f}\u{0}"),
                body: b"\xc3\x28{\"status\":",
                body_truncated: status % 2 == 0,
            };
            let _ = classify(&answer, UNIX_EPOCH);
        }
    }

    #[test]
    fn truncate_chars_table() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, ""),
            ("", 5, ""),
            ("abc", 0, ""),
            ("abc", 3, "abc"),
            ("abc", 4, "abc"),
            ("abcd", 3, "ab…"),
            ("abcd", 1, "…"),
            ("ab cd", 4, "ab…"),
            // Multibyte: 'é' is 2 bytes, '€' 3, '🦀' 4; cuts land on chars.
            ("éééé", 4, "éééé"),
            ("ééééé", 4, "ééé…"),
            ("€€€€€", 3, "€€…"),
            ("🦀🦀🦀", 2, "🦀…"),
            ("a🦀b🦀c", 4, "a🦀b…"),
            // A combining accent is its own char: "e\u{301}" counts as 2.
            ("e\u{301}e\u{301}", 3, "e\u{301}…"),
        ];
        for &(text, max, want) in cases {
            let got = truncate_chars(text, max);
            assert_eq!(got, want, "truncate_chars({text:?}, {max})");
            assert!(got.chars().count() <= max, "{got:?} is over {max} chars");
        }
    }

    #[test]
    fn truncate_chars_never_exceeds_max() {
        let text = "aé€🦀 ".repeat(50);
        for max in 0..=text.chars().count() + 2 {
            let got = truncate_chars(&text, max);
            assert!(got.chars().count() <= max, "max {max}: {got:?}");
            let kept = got.strip_suffix('…').unwrap_or(&got);
            assert!(text.starts_with(kept), "max {max}: {got:?} is not a prefix");
        }
    }
}
