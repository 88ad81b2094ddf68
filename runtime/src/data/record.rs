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
