//! One training record as read from a file: an Alpaca instruction/input/output triple or a chat.

use std::fmt;

/// Who speaks a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role as chat templates see it: `"system"`, `"user"`, `"assistant"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// The role named `s`, if it is one of the three.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message { role, content: content.into() }
    }
}

/// A Stanford Alpaca record; `input` is empty when the record has none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlpacaRecord {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

impl AlpacaRecord {
    /// The record as a two-message chat: user = instruction, plus `"\n\n"` + input when there is one;
    /// assistant = output.
    pub fn to_messages(&self) -> Vec<Message> {
        let user = if self.input.is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n\n{}", self.instruction, self.input)
        };
        vec![Message::new(Role::User, user), Message::new(Role::Assistant, self.output.clone())]
    }
}

/// A training record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Alpaca(AlpacaRecord),
    /// The messages in order; never empty.
    Chat(Vec<Message>),
}

/// A record and the 1-based line of its file where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRecord {
    pub line: usize,
    pub record: Record,
}

/// The first `max` bytes of `s`, cut back to a character boundary.
pub fn cut_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

impl Record {
    /// The record with at most `max_bytes` bytes of text (its fields or message contents in order, the one crossing
    /// the bound cut at a character boundary, the ones after it empty or dropped) and at most `max_messages`
    /// messages; `None` when it already fits. Training reads only the start of a record, so a huge one is cut before
    /// it is rendered and tokenized, which then cost time and memory bounded by `max_bytes`.
    pub fn cut(&self, max_bytes: usize, max_messages: usize) -> Option<Record> {
        let take = |s: &str, left: &mut usize| -> String {
            let kept = cut_str(s, *left);
            *left -= kept.len();
            kept.to_string()
        };
        let mut left = max_bytes;
        match self {
            Record::Alpaca(a) => {
                if a.instruction.len().saturating_add(a.input.len()).saturating_add(a.output.len()) <= max_bytes {
                    return None;
                }
                let instruction = take(&a.instruction, &mut left);
                let input = take(&a.input, &mut left);
                let output = take(&a.output, &mut left);
                Some(Record::Alpaca(AlpacaRecord { instruction, input, output }))
            }
            Record::Chat(messages) => {
                let bytes = messages.iter().fold(0usize, |n, m| n.saturating_add(m.content.len()));
                if bytes <= max_bytes && messages.len() <= max_messages {
                    return None;
                }
                let mut out = Vec::new();
                for m in messages.iter().take(max_messages.max(1)) {
                    let content = take(&m.content, &mut left);
                    let cut = content.len() < m.content.len();
                    out.push(Message { role: m.role, content });
                    if cut || left == 0 {
                        break;
                    }
                }
                Some(Record::Chat(out))
            }
        }
    }
}
