//! Avro object container files (the `.avro` files of `sfs generate --out
//! file`): a header carrying the writer schema, then blocks of datums.
//! Uncompressed (`avro.codec` = `null`), readable by any Avro library.

use std::io::{self, Write};

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
    }
}
