//! Avro object container files (the `.avro` files of `sfs generate --out
//! file`): a header carrying the writer schema, then blocks of datums.
//! Uncompressed (`avro.codec` = `null`), readable by any Avro library.

use std::io::{self, Write};

use crate::avro::EventKind;
use crate::codec::binary::Reader;
use crate::codec::AvroError;
use crate::codec::{write_datum, EncodeError, Event};

const MAGIC: &[u8; 4] = b"Obj\x01";
/// Fixed sync marker: the output of a seeded run is byte-for-byte reproducible.
const SYNC: [u8; 16] = [
    0x9e, 0x37, 0x79, 0xb9, 0x7f, 0x4a, 0x7c, 0x15, 0xf3, 0x9c, 0xc0, 0x60, 0x5c, 0xed, 0xc8, 0x34,
];
/// A block is flushed once its datums reach this many bytes.
const BLOCK_BYTES: usize = 256 * 1024;

/// Writes events of one kind, under one shipped schema version, to `W`.
#[derive(Debug)]
pub struct ContainerWriter<W: Write> {
    out: W,
    version: u32,
    block: Vec<u8>,
    count: i64,
    header: Vec<u8>,
}

fn long(out: &mut Vec<u8>, v: i64) {
    crate::codec::write_long_to(out, v);
}

impl<W: Write> ContainerWriter<W> {
    /// Writes the header for `E` at shipped `version`.
    pub fn new<E: Event>(mut out: W, version: u32) -> Result<Self, io::Error> {
        let known = E::KIND.known(version).ok_or_else(|| {
            io::Error::other(EncodeError::UnknownVersion {
                kind: E::KIND,
                version,
            })
        })?;
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        long(&mut header, 2);
        for (key, value) in [
            ("avro.schema", known.text.as_bytes()),
            ("avro.codec", b"null".as_slice()),
        ] {
            long(&mut header, key.len() as i64);
            header.extend_from_slice(key.as_bytes());
            long(&mut header, value.len() as i64);
            header.extend_from_slice(value);
        }
        long(&mut header, 0);
        header.extend_from_slice(&SYNC);
        out.write_all(&header)?;
        Ok(ContainerWriter {
            out,
            version,
            block: Vec::with_capacity(BLOCK_BYTES + 1024),
            count: 0,
            header,
        })
    }

    /// Appends one event.
    pub fn append<E: Event>(&mut self, event: &E) -> Result<(), io::Error> {
        write_datum(event, self.version, &mut self.block).map_err(io::Error::other)?;
        self.count += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<(), io::Error> {
        if self.count == 0 {
            return Ok(());
        }
        self.header.clear();
        long(&mut self.header, self.count);
        long(&mut self.header, self.block.len() as i64);
        self.out.write_all(&self.header)?;
        self.out.write_all(&self.block)?;
        self.out.write_all(&SYNC)?;
        self.block.clear();
        self.count = 0;
        Ok(())
    }

    /// Writes the last block and returns the sink.
    pub fn finish(mut self) -> Result<W, io::Error> {
        self.flush_block()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Why a container file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("not an Avro object container file (bad magic)")]
    BadMagic,
    #[error("truncated container file")]
    Truncated,
    #[error("container codec {0:?} is not supported (only null)")]
    Codec(String),
    #[error("container schema is not a shipped {kind} schema: {detail}")]
    Schema { kind: EventKind, detail: String },
    #[error("block {block}: sync marker does not match the header's")]
    Sync { block: u64 },
    #[error("block {block}, datum {datum}: {error}")]
    Datum {
        block: u64,
        datum: i64,
        error: AvroError,
    },
}

/// Reads the events of one kind from an object container file in memory,
/// written by [`ContainerWriter`] or any Avro library (codec `null`, writer
/// schema one of the shipped versions of `E`).
#[derive(Debug)]
pub struct ContainerReader<'a, E> {
    rest: &'a [u8],
    sync: [u8; 16],
    version: u32,
    block: &'a [u8],
    left: i64,
    blocks: u64,
    datum: i64,
    kind: std::marker::PhantomData<E>,
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], ContainerError> {
    if buf.len() < n {
        return Err(ContainerError::Truncated);
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn read_long(buf: &mut &[u8]) -> Result<i64, ContainerError> {
    let mut r = Reader::new(buf);
    let v = r.long().map_err(|_| ContainerError::Truncated)?;
    *buf = &buf[r.position()..];
    Ok(v)
}

fn read_bytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], ContainerError> {
    let len = usize::try_from(read_long(buf)?).map_err(|_| ContainerError::Truncated)?;
    take(buf, len)
}

impl<'a, E: Event> ContainerReader<'a, E> {
    /// Parses the header; the datums are read by iterating.
    pub fn new(bytes: &'a [u8]) -> Result<Self, ContainerError> {
        let mut rest = bytes;
        if take(&mut rest, 4).map_err(|_| ContainerError::BadMagic)? != MAGIC {
            return Err(ContainerError::BadMagic);
        }
        let (mut schema, mut codec) = (None, None);
        loop {
            let mut count = read_long(&mut rest)?;
            if count == 0 {
                break;
            }
            if count < 0 {
                count = -count;
                read_long(&mut rest)?;
            }
            for _ in 0..count {
                let key = read_bytes(&mut rest)?;
                let value = read_bytes(&mut rest)?;
                match key {
                    b"avro.schema" => schema = Some(value),
                    b"avro.codec" => codec = Some(value),
                    _ => {}
                }
            }
        }
        let codec = String::from_utf8_lossy(codec.unwrap_or(b"null")).into_owned();
        if codec != "null" {
            return Err(ContainerError::Codec(codec));
        }
        let bad = |detail: String| ContainerError::Schema {
            kind: E::KIND,
            detail,
        };
        let text = std::str::from_utf8(schema.ok_or_else(|| bad("no avro.schema".into()))?)
            .map_err(|e| bad(e.to_string()))?;
        let parsed = apache_avro::Schema::parse_str(text).map_err(|e| bad(e.to_string()))?;
        let known = crate::avro::identify(&parsed)
            .filter(|k| k.kind == E::KIND)
            .ok_or_else(|| bad("unknown schema".into()))?;
        let mut sync = [0u8; 16];
        sync.copy_from_slice(take(&mut rest, 16)?);
        Ok(ContainerReader {
            rest,
            sync,
            version: known.version,
            block: &[],
            left: 0,
            blocks: 0,
            datum: 0,
            kind: std::marker::PhantomData,
        })
    }

    /// The writer schema's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The number of datums not yet read, counted from the block headers
    /// without decoding the blocks (a capacity hint: a corrupt block is
    /// reported by the iteration, not here).
    pub fn remaining(&self) -> Result<usize, ContainerError> {
        let mut rest = self.rest;
        let mut n = usize::try_from(self.left).map_err(|_| ContainerError::Truncated)?;
        while !rest.is_empty() {
            let count = read_long(&mut rest)?;
            let size = read_long(&mut rest)?;
            let size = usize::try_from(size).map_err(|_| ContainerError::Truncated)?;
            take(&mut rest, size + 16)?;
            n += usize::try_from(count).map_err(|_| ContainerError::Truncated)?;
        }
        Ok(n)
    }

    fn next_block(&mut self) -> Result<bool, ContainerError> {
        while self.left == 0 {
            if self.rest.is_empty() {
                return Ok(false);
            }
            self.left = read_long(&mut self.rest)?;
            let size = usize::try_from(read_long(&mut self.rest)?)
                .map_err(|_| ContainerError::Truncated)?;
            self.block = take(&mut self.rest, size)?;
            if take(&mut self.rest, 16)? != self.sync {
                return Err(ContainerError::Sync { block: self.blocks });
            }
            self.blocks += 1;
            self.datum = 0;
        }
        Ok(true)
    }
}

impl<E: Event> Iterator for ContainerReader<'_, E> {
    type Item = Result<E, ContainerError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_block() {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                self.rest = &[];
                self.left = 0;
                return Some(Err(e));
            }
        }
        let mut r = Reader::new(self.block);
        let result = E::read_datum(&mut r, self.version);
        self.block = &self.block[r.position()..];
        self.left -= 1;
        self.datum += 1;
        Some(result.map_err(|error| {
            // A datum that does not parse leaves the rest of its block unreadable.
            self.left = 0;
            ContainerError::Datum {
                block: self.blocks - 1,
                datum: self.datum - 1,
                error,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Label;

    #[test]
    fn apache_avro_reads_what_we_write() {
        let labels: Vec<Label> = (0..10_000)
            .map(|i| Label {
                event_id: format!("t-{i}"),
                card_id: format!("c-{}", i % 7),
                is_fraud: i % 3 == 0,
                fraud_type: (i % 3 == 0).then(|| "card_testing".to_owned()),
                label_time: i,
            })
            .collect();
        let mut w = ContainerWriter::new::<Label>(Vec::new(), 1).unwrap();
        for l in &labels {
            w.append(l).unwrap();
        }
        let bytes = w.finish().unwrap();
        let reader = apache_avro::Reader::new(&bytes[..]).unwrap();
        let mut n = 0;
        for (value, expected) in reader.zip(&labels) {
            let value = value.unwrap();
            let apache_avro::types::Value::Record(fields) = value else {
                panic!("not a record")
            };
            assert_eq!(
                fields[0].1,
                apache_avro::types::Value::String(expected.event_id.clone())
            );
            n += 1;
        }
        assert_eq!(n, labels.len());
        let back: Vec<Label> = ContainerReader::<Label>::new(&bytes)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, labels);
    }

    #[test]
    fn a_container_of_another_kind_or_a_corrupt_block_is_an_error() {
        let label = Label {
            event_id: "t".into(),
            card_id: "c".into(),
            is_fraud: true,
            fraud_type: None,
            label_time: 5,
        };
        let mut w = ContainerWriter::new::<Label>(Vec::new(), 1).unwrap();
        w.append(&label).unwrap();
        let mut bytes = w.finish().unwrap();
        assert!(matches!(
            ContainerReader::<crate::event::Txn>::new(&bytes),
            Err(ContainerError::Schema { .. })
        ));
        assert!(matches!(
            ContainerReader::<Label>::new(b"nope"),
            Err(ContainerError::BadMagic)
        ));
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let read: Vec<_> = ContainerReader::<Label>::new(&bytes).unwrap().collect();
        assert!(matches!(read[..], [Err(ContainerError::Sync { block: 0 })]));
    }
}
