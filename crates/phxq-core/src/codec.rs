//! The building blocks of our encodings (raft entry batches and snapshots): LEB128 varints
//! and length-prefixed byte strings.
//!
//! The reader trusts nothing it reads: every length and count is checked against the bytes
//! that remain before anything is allocated, so arbitrary input costs at most its own size and
//! never panics. Varints must be minimal, so each value has exactly one encoding.

use crate::DecodeError;

/// Longest LEB128 encoding of a `u64`.
pub(crate) const VARINT_BYTES_MAX: usize = 10;

/// Appends `value` as an LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends `bytes` prefixed with their length.
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads values back from a byte slice, front to back.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, position: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    fn error(&self, what: &str, problem: &str) -> DecodeError {
        DecodeError::Invalid(format!("{what} at byte {}: {problem}", self.position))
    }

    /// One byte.
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        let byte = *self
            .bytes
            .get(self.position)
            .ok_or_else(|| self.error(what, "input ends"))?;
        self.position += 1;
        Ok(byte)
    }

    /// A minimal LEB128 varint.
    pub(crate) fn varint(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for length in 0..VARINT_BYTES_MAX {
            let byte = self.u8(what)?;
            let bits = u64::from(byte & 0x7f);
            if length == VARINT_BYTES_MAX - 1 && bits > 1 {
                return Err(self.error(what, "varint overflows 64 bits"));
            }
            value |= bits << (7 * length);
            if byte & 0x80 == 0 {
                if byte == 0 && length > 0 {
                    return Err(self.error(what, "varint is not minimal"));
                }
                return Ok(value);
            }
        }
        Err(self.error(what, "varint longer than 10 bytes"))
    }

    /// A varint that must fit a `u32`.
    pub(crate) fn varint_u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let value = self.varint(what)?;
        u32::try_from(value).map_err(|_| self.error(what, "value over u32"))
    }

    /// A count of items that each take at least one byte: never more than the bytes left, so
    /// it is safe to reserve that many.
    pub(crate) fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let count = self.varint(what)?;
        match usize::try_from(count) {
            Ok(count) if count <= self.remaining() => Ok(count),
            _ => Err(self.error(what, "count exceeds the input")),
        }
    }

    /// A length-prefixed byte string.
    pub(crate) fn bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let length = self.count(what)?;
        let bytes = &self.bytes[self.position..self.position + length];
        self.position += length;
        Ok(bytes)
    }

    /// A length-prefixed UTF-8 string.
    pub(crate) fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let bytes = self.bytes(what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error(what, "not UTF-8"))
    }

    /// Succeeds only if everything was read.
    pub(crate) fn finish(&self, what: &str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(self.error(what, &format!("{extra} trailing bytes"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(value: u64) -> Result<u64, DecodeError> {
        let mut out = Vec::new();
        put_varint(&mut out, value);
        let mut reader = Reader::new(&out);
        let decoded = reader.varint("value")?;
        reader.finish("value")?;
        Ok(decoded)
    }

    #[test]
    fn varints_round_trip_at_every_width() {
        for shift in 0..64 {
            for value in [(1u64 << shift) - 1, 1u64 << shift, (1u64 << shift) + 1] {
                assert_eq!(round_trip(value), Ok(value));
            }
        }
        assert_eq!(round_trip(u64::MAX), Ok(u64::MAX));
    }

    #[test]
    fn overlong_overflowing_and_unterminated_varints_are_refused() {
        let refused = |bytes: &[u8]| Reader::new(bytes).varint("value").is_err();
        assert!(refused(&[0x80, 0x00]), "zero written in two bytes");
        assert!(refused(
            &[0xff; 9].iter().copied().chain([0x02]).collect::<Vec<_>>()
        ));
        assert!(refused(&[0x80; 11]));
        assert!(refused(&[0x80]));
        assert!(refused(&[]));
    }

    #[test]
    fn a_length_beyond_the_input_is_refused_before_allocating() {
        let mut out = Vec::new();
        put_varint(&mut out, u64::MAX);
        assert!(Reader::new(&out).bytes("key").is_err());
        let mut out = Vec::new();
        put_bytes(&mut out, b"abc");
        out.pop();
        assert!(Reader::new(&out).bytes("key").is_err());
    }
}
