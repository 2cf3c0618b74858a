//! The frame: the one unit of node-to-node data traffic, and its codec.
//!
//! This module owns the byte layout of a frame and keeps one invariant: **a frame is handed
//! out only when every header field is valid and its crc32 matches**. Anything else (wrong
//! magic, non-zero reserved bits, unknown kind or flags, an oversized payload, a checksum
//! mismatch) is a [`FrameError`], which callers treat as a broken connection. Bytes from the
//! network are never unwrapped and a header that announces too large a payload is refused
//! before a single payload byte is awaited, so a peer cannot make us buffer more than
//! [`HEADER_LEN`] + [`MAX_PAYLOAD`] bytes per frame.
//!
//! Layout (big endian, [`HEADER_LEN`] = 56 bytes of header, then `payload_len` bytes):
//!
//! | offset | size | field         | meaning                                              |
//! |-------:|-----:|---------------|------------------------------------------------------|
//! |      0 |    4 | `magic`       | `"TDM1"` ([`MAGIC`])                                  |
//! |      4 |    1 | `kind`        | [`Kind`] as a stable `u8`                            |
//! |      5 |    1 | `flags`       | [`FLAG_FUA`]; other bits must be 0                   |
//! |      6 |    2 | `reserved`    | must be 0                                            |
//! |      8 |    8 | `request_id`  | chosen by the client, echoed by the reply            |
//! |     16 |    8 | `volume_id`   |                                                      |
//! |     24 |    8 | `generation`  | the volume generation the sender believes in         |
//! |     32 |    8 | `offset`      | byte offset of the I/O                               |
//! |     40 |    4 | `length`      | I/O length: bytes to read, to write or to zero       |
//! |     44 |    4 | `status`      | errno in replies, 0 = ok                             |
//! |     48 |    4 | `payload_len` | at most [`MAX_PAYLOAD`]                              |
//! |     52 |    4 | `crc32`       | crc32fast over bytes 0..52, then over the payload    |
//!
//! A single flipped bit anywhere in an encoded frame never yields a different valid frame:
//! crc32 detects every burst error of up to 32 bits over the same bytes; a flip that grows
//! `payload_len` makes the decoder wait for bytes that belong to the next frame (whose
//! magic then fails, or the checksum does), and one that shrinks it changes the bytes the
//! checksum covers, which is caught with probability 1 - 2^-32.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::store::MAX_IO_BYTES;

/// `"TDM1"`: Tandem data-path protocol, frame format 1.
pub const MAGIC: u32 = u32::from_be_bytes(*b"TDM1");

/// Bytes of the fixed header, crc32 field included (see the module doc for the layout).
pub const HEADER_LEN: usize = 56;

/// Offset of the crc32 field: the checksum covers the header bytes before it.
const CRC_OFFSET: usize = 52;

/// Largest payload a frame may carry: the largest I/O the store accepts
/// ([`MAX_IO_BYTES`], 32 MiB) plus 64 KiB of room for checksum lists and region lists (a
/// 32 MiB range has 8192 blocks of 4 KiB, whose crc32s take 32 KiB).
pub const MAX_PAYLOAD: usize = MAX_IO_BYTES + 64 * 1024;

/// Force unit access: the write (or zeroing) must be durable before it is acknowledged.
pub const FLAG_FUA: u8 = 0x01;

/// Every flag bit this version of the protocol knows. A frame with any other bit set is
/// refused: new flags come with a new protocol version in the handshake, never silently.
pub const KNOWN_FLAGS: u8 = FLAG_FUA;

/// Status of a successful reply. Failed replies carry a positive errno.
pub const STATUS_OK: u32 = 0;

/// What a frame asks for. The `u8` values are part of the protocol: never renumber, only
/// append. 0 is deliberately unused so that a zeroed header never decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// RTT probe; answered by the connection itself with [`Kind::Pong`].
    Ping = 1,
    /// The answer to a [`Kind::Ping`].
    Pong = 2,
    /// Open (or check) a replica of `volume_id` at `generation`.
    Open = 3,
    /// Read `length` bytes at `offset`; the reply carries the data.
    Read = 4,
    /// Write the payload (`length` bytes) at `offset`.
    Write = 5,
    /// Make every acknowledged write durable.
    Flush = 6,
    /// Zero `length` bytes at `offset`.
    WriteZeroes = 7,
    /// Ask for the per-block crc32s of a range (resync).
    Checksums = 8,
    /// Ask for the activity log's hot regions (resync after a crash).
    HotRegions = 9,
    /// The answer to any request but [`Kind::Ping`].
    Reply = 10,
    /// Clear the replica's suspect flags (offset = the suspect epoch its `Open` reported)
    /// after a full comparison.
    ClearSuspect = 11,
    /// Seal the replica's head as a snapshot (the payload is the snapshot id, UTF-8): every
    /// write acknowledged before is in it, none that comes after.
    Seal = 12,
    /// Delete a snapshot from the replica (the payload is its id); deleting one it does not
    /// hold succeeds.
    DeleteSnapshot = 13,
}

impl Kind {
    /// Every kind, in wire-value order.
    pub const ALL: [Kind; 13] = [
        Kind::Ping,
        Kind::Pong,
        Kind::Open,
        Kind::Read,
        Kind::Write,
        Kind::Flush,
        Kind::WriteZeroes,
        Kind::Checksums,
        Kind::HotRegions,
        Kind::Reply,
        Kind::ClearSuspect,
        Kind::Seal,
        Kind::DeleteSnapshot,
    ];

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The kind with wire value `v`, if there is one.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_u8() == v)
    }

    /// Whether a client may send this kind (everything but the two answers).
    pub fn is_request(self) -> bool {
        !matches!(self, Kind::Pong | Kind::Reply)
    }
}

/// Why bytes from the network are not a frame. Every variant means the stream can no
/// longer be trusted: the connection carrying it must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x} (expected {MAGIC:#010x} \"TDM1\")")]
    BadMagic { found: u32 },
    #[error("frame reserved field is {found:#06x}, must be 0")]
    ReservedNonZero { found: u16 },
    #[error("unknown frame kind {found}")]
    UnknownKind { found: u8 },
    #[error("unknown frame flags {found:#04x} (known: {KNOWN_FLAGS:#04x})")]
    UnknownFlags { found: u8 },
    #[error("frame payload of {len} bytes exceeds the {max}-byte maximum")]
    PayloadTooLarge { len: u64, max: usize },
    #[error("frame checksum mismatch: header says {expected:#010x}, bytes give {computed:#010x}")]
    ChecksumMismatch { expected: u32, computed: u32 },
}

/// One frame. Requests are built with [`Frame::request`] (the client assigns
/// `request_id`), replies with [`Frame::reply_to`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u8,
    pub request_id: u64,
    pub volume_id: u64,
    pub generation: u64,
    pub offset: u64,
    /// The I/O length (bytes to read, write or zero), not the payload length.
    pub length: u32,
    /// errno in replies, [`STATUS_OK`] otherwise.
    pub status: u32,
    pub payload: Bytes,
}

impl Frame {
    /// A request; `request_id` stays 0 until the client assigns one.
    ///
    /// Panics if `kind` is an answer ([`Kind::Pong`], [`Kind::Reply`]): that is a bug in
    /// the caller, not a condition of the network.
    pub fn request(
        kind: Kind,
        volume_id: u64,
        generation: u64,
        offset: u64,
        length: u32,
        payload: Bytes,
    ) -> Frame {
        assert!(kind.is_request(), "{kind:?} is not a request kind");
        Frame {
            kind,
            flags: 0,
            request_id: 0,
            volume_id,
            generation,
            offset,
            length,
            status: STATUS_OK,
            payload,
        }
    }

    /// A ping (RTT probe).
    pub fn ping() -> Frame {
        Frame::request(Kind::Ping, 0, 0, 0, 0, Bytes::new())
    }

    /// The answer to `req`: [`Kind::Pong`] for a ping, [`Kind::Reply`] otherwise, with the
    /// request's id, volume, generation, offset and length echoed back.
    pub fn reply_to(req: &Frame, status: u32, payload: Bytes) -> Frame {
        Frame {
            kind: if req.kind == Kind::Ping {
                Kind::Pong
            } else {
                Kind::Reply
            },
            flags: 0,
            request_id: req.request_id,
            volume_id: req.volume_id,
            generation: req.generation,
            offset: req.offset,
            length: req.length,
            status,
            payload,
        }
    }

    /// The same frame with `flags` set (see [`FLAG_FUA`]).
    pub fn with_flags(mut self, flags: u8) -> Frame {
        self.flags = flags;
        self
    }

    /// Whether [`FLAG_FUA`] is set.
    pub fn is_fua(&self) -> bool {
        self.flags & FLAG_FUA != 0
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// The encoded header of `frame`, crc32 included. Writers send it followed by
/// `frame.payload`, which saves copying large payloads into a frame buffer.
///
/// Panics if the payload is larger than [`MAX_PAYLOAD`] or the flags are unknown: senders
/// check sizes before they queue a frame, so reaching this is a bug.
pub fn encode_header(frame: &Frame) -> [u8; HEADER_LEN] {
    assert!(
        frame.payload.len() <= MAX_PAYLOAD,
        "frame payload of {} bytes exceeds MAX_PAYLOAD",
        frame.payload.len()
    );
    assert_eq!(
        frame.flags & !KNOWN_FLAGS,
        0,
        "unknown frame flags {:#04x}",
        frame.flags
    );
    let mut header = [0u8; HEADER_LEN];
    let mut w = &mut header[..];
    w.put_u32(MAGIC);
    w.put_u8(frame.kind.as_u8());
    w.put_u8(frame.flags);
    w.put_u16(0);
    w.put_u64(frame.request_id);
    w.put_u64(frame.volume_id);
    w.put_u64(frame.generation);
    w.put_u64(frame.offset);
    w.put_u32(frame.length);
    w.put_u32(frame.status);
    // Cannot truncate: MAX_PAYLOAD < u32::MAX, asserted above.
    w.put_u32(frame.payload.len() as u32);
    let crc = checksum(&header[..CRC_OFFSET], &frame.payload);
    header[CRC_OFFSET..].copy_from_slice(&crc.to_be_bytes());
    header
}

/// Appends the encoding of `frame` to `dst`. Panics like [`encode_header`].
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(frame.encoded_len());
    dst.put_slice(&encode_header(frame));
    dst.put_slice(&frame.payload);
}

/// Takes one frame off the front of `src`.
///
/// * `Ok(Some(frame))`: a valid frame; its bytes are consumed (the payload shares `src`'s
///   allocation, no copy).
/// * `Ok(None)`: `src` holds a valid prefix of a frame; read more and call again. Nothing is
///   consumed, and once the header is in, `src` has reserved room for the whole frame.
/// * `Err(_)`: the stream is corrupt; `src` is left as it was and the connection must go.
///
/// The header is validated as soon as it is complete (the magic as soon as its first byte
/// arrives), before any payload byte is awaited.
pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let magic_prefix = &src[..src.len().min(4)];
    if magic_prefix != &MAGIC.to_be_bytes()[..magic_prefix.len()] {
        let mut found = [0u8; 4];
        found[..magic_prefix.len()].copy_from_slice(magic_prefix);
        return Err(FrameError::BadMagic {
            found: u32::from_be_bytes(found),
        });
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }

    // `Buf` on a slice of known length: cannot run short, HEADER_LEN bytes are there.
    let mut h = &src[4..HEADER_LEN];
    let kind_byte = h.get_u8();
    let flags = h.get_u8();
    let reserved = h.get_u16();
    let request_id = h.get_u64();
    let volume_id = h.get_u64();
    let generation = h.get_u64();
    let offset = h.get_u64();
    let length = h.get_u32();
    let status = h.get_u32();
    let payload_len = h.get_u32();
    let expected_crc = h.get_u32();

    if reserved != 0 {
        return Err(FrameError::ReservedNonZero { found: reserved });
    }
    let kind = Kind::from_u8(kind_byte).ok_or(FrameError::UnknownKind { found: kind_byte })?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::UnknownFlags { found: flags });
    }
    let payload_len = payload_len as usize;
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge {
            len: payload_len as u64,
            max: MAX_PAYLOAD,
        });
    }

    let total = HEADER_LEN + payload_len;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }

    let computed_crc = checksum(&src[..CRC_OFFSET], &src[HEADER_LEN..total]);
    if computed_crc != expected_crc {
        return Err(FrameError::ChecksumMismatch {
            expected: expected_crc,
            computed: computed_crc,
        });
    }

    let mut bytes = src.split_to(total).freeze();
    let payload = bytes.split_off(HEADER_LEN);
    Ok(Some(Frame {
        kind,
        flags,
        request_id,
        volume_id,
        generation,
        offset,
        length,
        status,
        payload,
    }))
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Frame {
        let mut f = Frame::request(Kind::Write, 7, 3, 4096, 5, Bytes::from_static(b"hello"))
            .with_flags(FLAG_FUA);
        f.request_id = 42;
        f
    }

    fn encoded(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        encode(f, &mut b);
        b
    }

    /// Rewrites the crc of an encoded frame after a deliberate header edit, so the test
    /// reaches the check it is aimed at rather than the checksum.
    fn reseal(b: &mut BytesMut) {
        let payload_len = b.len() - HEADER_LEN;
        let crc = checksum(&b[..CRC_OFFSET], &b[HEADER_LEN..HEADER_LEN + payload_len]);
        b[CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn header_is_56_bytes_and_big_endian() {
        let f = sample();
        let b = encoded(&f);
        assert_eq!(b.len(), HEADER_LEN + 5);
        assert_eq!(&b[0..4], b"TDM1");
        assert_eq!(b[4], Kind::Write.as_u8());
        assert_eq!(b[5], FLAG_FUA);
        assert_eq!(&b[8..16], &42u64.to_be_bytes());
        assert_eq!(&b[32..40], &4096u64.to_be_bytes());
        assert_eq!(&b[48..52], &5u32.to_be_bytes());
        assert_eq!(&b[HEADER_LEN..], b"hello");
    }

    #[test]
    fn kind_values_are_stable() {
        // The numbers are the protocol: a renumbering would break mixed-version clusters.
        let values: Vec<u8> = Kind::ALL.iter().map(|k| k.as_u8()).collect();
        assert_eq!(values, (1..=13).collect::<Vec<u8>>());
        assert_eq!(Kind::from_u8(0), None);
        assert_eq!(Kind::from_u8(14), None);
    }

    #[test]
    fn decode_waits_for_the_whole_frame_byte_by_byte() {
        let f = sample();
        let full = encoded(&f);
        let mut buf = BytesMut::new();
        for (i, byte) in full.iter().enumerate() {
            buf.put_u8(*byte);
            let got = decode(&mut buf).expect("a valid prefix is not an error");
            if i + 1 < full.len() {
                assert_eq!(got, None, "decoded early at byte {i}");
            } else {
                assert_eq!(got, Some(f.clone()));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn decode_takes_back_to_back_frames_one_at_a_time() {
        let a = sample();
        let b = Frame::reply_to(&a, 5, Bytes::new());
        let mut buf = encoded(&a);
        encode(&b, &mut buf);
        assert_eq!(decode(&mut buf).unwrap(), Some(a));
        assert_eq!(decode(&mut buf).unwrap(), Some(b));
        assert_eq!(decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn bad_magic_is_refused_from_its_first_byte() {
        let mut buf = BytesMut::from(&b"X"[..]);
        assert!(matches!(decode(&mut buf), Err(FrameError::BadMagic { .. })));
        let mut b = encoded(&sample());
        b[3] = b'2';
        assert_eq!(
            decode(&mut b),
            Err(FrameError::BadMagic {
                found: u32::from_be_bytes(*b"TDM2")
            })
        );
    }

    #[test]
    fn reserved_bits_are_refused() {
        let mut b = encoded(&sample());
        b[7] = 1;
        reseal(&mut b);
        assert_eq!(
            decode(&mut b),
            Err(FrameError::ReservedNonZero { found: 1 })
        );
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut b = encoded(&sample());
        b[4] = 0;
        reseal(&mut b);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownKind { found: 0 }));
        b[4] = 200;
        reseal(&mut b);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownKind { found: 200 }));
    }

    #[test]
    fn unknown_flags_are_refused() {
        let mut b = encoded(&sample());
        b[5] = 0x80;
        reseal(&mut b);
        assert_eq!(
            decode(&mut b),
            Err(FrameError::UnknownFlags { found: 0x80 })
        );
    }

    #[test]
    fn oversized_payload_is_refused_from_the_header_alone() {
        // Only the header is sent: the decoder must not wait for 32 MiB that never come.
        let mut b = encoded(&Frame::ping());
        let len = (MAX_PAYLOAD + 1) as u32;
        b[48..52].copy_from_slice(&len.to_be_bytes());
        reseal(&mut b);
        assert_eq!(
            decode(&mut b),
            Err(FrameError::PayloadTooLarge {
                len: len as u64,
                max: MAX_PAYLOAD
            })
        );
    }

    #[test]
    fn largest_payload_round_trips() {
        let payload = Bytes::from(vec![0xA5u8; MAX_PAYLOAD]);
        let f = Frame::request(Kind::Write, 1, 1, 0, MAX_IO_BYTES as u32, payload);
        let mut b = encoded(&f);
        assert_eq!(decode(&mut b).unwrap(), Some(f));
    }

    #[test]
    fn checksum_mismatch_is_refused_in_header_and_payload() {
        let mut b = encoded(&sample());
        b[HEADER_LEN] ^= 0x01;
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::ChecksumMismatch { .. })
        ));
        let mut b = encoded(&sample());
        b[20] ^= 0x10; // volume_id
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn reply_echoes_the_request_and_ping_gets_pong() {
        let req = sample();
        let reply = Frame::reply_to(&req, 5, Bytes::new());
        assert_eq!(reply.kind, Kind::Reply);
        assert_eq!(
            (reply.request_id, reply.volume_id, reply.generation),
            (42, 7, 3)
        );
        assert_eq!((reply.offset, reply.length, reply.status), (4096, 5, 5));
        assert_eq!(
            Frame::reply_to(&Frame::ping(), 0, Bytes::new()).kind,
            Kind::Pong
        );
    }

    #[test]
    #[should_panic(expected = "not a request kind")]
    fn request_constructor_refuses_answer_kinds() {
        let _ = Frame::request(Kind::Reply, 0, 0, 0, 0, Bytes::new());
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            proptest::sample::select(Kind::ALL.to_vec()),
            prop_oneof![Just(0u8), Just(FLAG_FUA)],
            any::<[u64; 4]>(),
            any::<[u32; 2]>(),
            proptest::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(
                |(kind, flags, [id, vol, gen, off], [len, status], p)| Frame {
                    kind,
                    flags,
                    request_id: id,
                    volume_id: vol,
                    generation: gen,
                    offset: off,
                    length: len,
                    status,
                    payload: Bytes::from(p),
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_frames_round_trip(f in arb_frame(), split in any::<prop::sample::Index>()) {
            let full = encoded(&f);
            // Fed in two pieces cut anywhere: the first piece never decodes.
            let cut = split.index(full.len());
            let mut buf = BytesMut::from(&full[..cut]);
            prop_assert_eq!(decode(&mut buf), Ok(None));
            buf.extend_from_slice(&full[cut..]);
            prop_assert_eq!(decode(&mut buf), Ok(Some(f)));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            with_magic in any::<bool>(),
        ) {
            // With a valid magic prepended the header checks get exercised, not just magic.
            let mut buf = BytesMut::new();
            if with_magic {
                buf.put_u32(MAGIC);
            }
            buf.extend_from_slice(&bytes);
            for _ in 0..8 {
                match decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn any_single_bit_flip_is_detected(f in arb_frame()) {
            let full = encoded(&f);
            for bit in 0..full.len() * 8 {
                let mut buf = full.clone();
                buf[bit / 8] ^= 1 << (bit % 8);
                // A grown payload_len waits for bytes (Ok(None)); anything else must be an
                // error, never a frame.
                if let Ok(Some(other)) = decode(&mut buf) {
                    prop_assert!(
                        false,
                        "bit {} flipped and still decoded: {:?} (sent {:?})", bit, other, f
                    );
                }
            }
        }
    }
}
