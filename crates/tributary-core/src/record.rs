//! Records as producers hand them in and as readers get them back.

use bytes::Bytes;

/// One header of a record: a name and opaque bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Bytes,
}

/// A record to append. `value: None` is a tombstone: under key compaction it deletes the key.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    /// Producer timestamp in ms since the epoch; 0 means "stamp it on append".
    pub timestamp_ms: i64,
}

impl Record {
    /// A record with a value and nothing else.
    pub fn from_value(value: impl Into<Bytes>) -> Self {
        Record { value: Some(value.into()), ..Record::default() }
    }

    /// A keyed record.
    pub fn keyed(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Record { key: Some(key.into()), value: Some(value.into()), ..Record::default() }
    }

    /// A tombstone for `key`.
    pub fn tombstone(key: impl Into<Bytes>) -> Self {
        Record { key: Some(key.into()), value: None, ..Record::default() }
    }

    /// The header named `name`, if any.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|h| h.name == name).map(|h| &h.value)
    }

    /// Bytes this record counts against [`crate::limits::MESSAGE_BYTES_MAX`].
    pub fn payload_bytes(&self) -> usize {
        self.key.as_ref().map_or(0, |k| k.len())
            + self.value.as_ref().map_or(0, |v| v.len())
            + self.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>()
    }
}

/// A record read back from a log, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

impl StoredRecord {
    /// The header named `name`, if any.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|h| h.name == name).map(|h| &h.value)
    }
}
