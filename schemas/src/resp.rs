//! RESP2 request encoding, shared by the job's Redis writer and the server's
//! Redis read client: commands are arrays of bulk strings.

/// Appends a RESP header: `kind` (`*` array, `$` bulk string) and a length.
pub fn header(buf: &mut Vec<u8>, kind: u8, n: usize) {
    buf.push(kind);
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// Appends `bytes` as a bulk string.
pub fn bulk(buf: &mut Vec<u8>, bytes: &[u8]) {
    header(buf, b'$', bytes.len());
    buf.extend_from_slice(bytes);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `parts`, concatenated, as one bulk string (a key built in place).
pub fn bulk_parts(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    header(buf, b'$', parts.iter().map(|p| p.len()).sum());
    parts.iter().for_each(|p| buf.extend_from_slice(p));
    buf.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut buf = Vec::new();
        super::header(&mut buf, b'*', 2);
        super::bulk(&mut buf, b"GET");
        super::bulk(&mut buf, b"");
        super::bulk_parts(&mut buf, &[b"p:", b"card", b":", b"c1"]);
        assert_eq!(buf, b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n$9\r\np:card:c1\r\n");
    }
}
