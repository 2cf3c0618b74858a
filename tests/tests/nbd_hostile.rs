//! Hostile, broken and unusual NBD clients against a real tandemd.
//!
//! Every test drives the daemon with a small raw NBD client written here (blocking
//! `TcpStream`, read and write timeouts on every socket), asserts on the exact bytes the
//! daemon sends back and on the data it stores, and finishes by checking that the daemon
//! is still running, answers `tandemctl status`, and counted exactly the connections it
//! had to drop in `tandem_nbd_connection_errors_total`.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use tandem_tests::{qemu_io_ok, Daemon, DaemonOpts};

// Protocol constants, spelled out here so the test does not trust the daemon's own copies.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_DF: u16 = 1 << 2;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

/// The daemon's documented limits (node/src/nbd.rs, engine store).
const MAX_OPTION_BYTES: u32 = 16 << 10;
const MAX_OPTIONS: usize = 128;
const MAX_IO_BYTES: u32 = 32 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Every socket read and write gives up after this, so no test can hang.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const VOL_SIZE: u64 = 64 << 20;
const ERRORS_METRIC: &str = "tandem_nbd_connection_errors_total";
const OPEN_CONNS_METRIC: &str = "tandem_nbd_connections";

/// Deterministic, position-dependent bytes: a misplaced or shifted block does not match.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Compares two buffers without dumping megabytes into the failure message.
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: expected {} bytes, got {}",
        expected.len(),
        actual.len()
    );
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: expected the stored pattern, first difference at byte {i}: got {:#04x}, expected {:#04x}",
            actual[i], expected[i]
        );
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A request header (28 bytes).
fn request_header(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    request_header_with_magic(REQUEST_MAGIC, flags, cmd, handle, offset, len)
}

fn request_header_with_magic(
    magic: u32,
    flags: u16,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(28);
    h.extend_from_slice(&magic.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&cmd.to_be_bytes());
    h.extend_from_slice(&handle.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// An option header (16 bytes) followed by its data.
fn option_bytes(opt: u32, declared_len: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&declared_len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of an NBD_OPT_INFO / NBD_OPT_GO request asking for name, description and
/// block sizes.
fn info_request(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    let reqs = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

#[derive(Debug)]
struct OptReply {
    opt: u32,
    kind: u32,
    data: Vec<u8>,
}

impl OptReply {
    fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What NBD_OPT_INFO / NBD_OPT_GO reported.
#[derive(Debug, Default)]
struct Export {
    size: u64,
    flags: u16,
    name: Option<String>,
    description: Option<String>,
    /// (minimum, preferred, maximum)
    block_sizes: Option<(u32, u32, u32)>,
}

/// A raw, blocking NBD client.
struct Client {
    s: TcpStream,
    next_handle: u64,
}

impl Client {
    /// Connects and checks the server greeting (newstyle, fixed, no zeroes).
    fn connect(d: &Daemon) -> Client {
        let s = TcpStream::connect(&d.nbd_addr)
            .unwrap_or_else(|e| panic!("expected to connect to NBD at {}: {e}", d.nbd_addr));
        s.set_read_timeout(Some(IO_TIMEOUT))
            .expect("set read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("set write timeout");
        s.set_nodelay(true).expect("set nodelay");
        let mut c = Client {
            s,
            next_handle: 0x7a00_0000_0000_0000,
        };
        let hello = c.recv(18, "server greeting");
        assert_eq!(
            be_u64(&hello[0..]),
            NBDMAGIC,
            "expected NBDMAGIC in greeting"
        );
        assert_eq!(
            be_u64(&hello[8..]),
            IHAVEOPT,
            "expected IHAVEOPT (newstyle) in greeting"
        );
        assert_eq!(
            be_u16(&hello[16..]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "expected handshake flags FIXED_NEWSTYLE|NO_ZEROES"
        );
        c
    }

    /// Connects and sends the usual client flags: ready for options.
    fn handshake(d: &Daemon) -> Client {
        let mut c = Client::connect(d);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    /// Handshake plus a successful NBD_OPT_GO: ready for requests.
    fn open(d: &Daemon, name: &str) -> (Client, Export) {
        let mut c = Client::handshake(d);
        let e = c.go(name);
        (c, e)
    }

    fn send(&mut self, b: &[u8]) {
        self.s
            .write_all(b)
            .unwrap_or_else(|e| panic!("expected to send {} bytes to the daemon: {e}", b.len()));
    }

    /// Sends where the server may already have closed (hostile clients).
    fn send_lossy(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    fn recv(&mut self, n: usize, what: &str) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("expected {n} bytes of {what} from the daemon: {e}"));
        b
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) {
        self.send(&option_bytes(opt, data.len() as u32, data));
    }

    fn option_reply(&mut self) -> OptReply {
        let h = self.recv(20, "option reply header");
        assert_eq!(be_u64(&h), REPLY_MAGIC, "expected option reply magic");
        let len = be_u32(&h[16..]) as usize;
        assert!(
            len <= 1 << 20,
            "expected a sane option reply length, got {len}"
        );
        let data = self.recv(len, "option reply data");
        OptReply {
            opt: be_u32(&h[8..]),
            kind: be_u32(&h[12..]),
            data,
        }
    }

    /// Sends an option and expects exactly one error reply of `kind` for it.
    fn expect_option_error(&mut self, opt: u32, data: &[u8], kind: u32) -> OptReply {
        self.send_option(opt, data);
        let r = self.option_reply();
        assert_eq!(r.opt, opt, "expected the reply to echo option {opt}");
        assert_eq!(
            r.kind,
            kind,
            "expected reply type {kind:#x} for option {opt}, got {:#x} ({})",
            r.kind,
            r.message()
        );
        r
    }

    /// NBD_OPT_INFO or NBD_OPT_GO; the error reply if the server refused.
    fn info_or_go(&mut self, opt: u32, name: &str) -> Result<Export, OptReply> {
        self.send_option(opt, &info_request(name));
        let mut export = None;
        let mut e = Export::default();
        loop {
            let r = self.option_reply();
            assert_eq!(r.opt, opt, "expected replies to echo option {opt}");
            match r.kind {
                REP_ACK => break,
                REP_INFO => {
                    assert!(r.data.len() >= 2, "expected an info type in REP_INFO");
                    let body = &r.data[2..];
                    match be_u16(&r.data) {
                        INFO_EXPORT => {
                            assert_eq!(body.len(), 10, "expected NBD_INFO_EXPORT of 12 bytes");
                            e.size = be_u64(body);
                            e.flags = be_u16(&body[8..]);
                            export = Some(());
                        }
                        INFO_NAME => e.name = Some(String::from_utf8_lossy(body).into_owned()),
                        INFO_DESCRIPTION => {
                            e.description = Some(String::from_utf8_lossy(body).into_owned())
                        }
                        INFO_BLOCK_SIZE => {
                            assert_eq!(body.len(), 12, "expected NBD_INFO_BLOCK_SIZE of 14 bytes");
                            e.block_sizes =
                                Some((be_u32(body), be_u32(&body[4..]), be_u32(&body[8..])));
                        }
                        // Unknown info types must be ignored by clients.
                        _ => {}
                    }
                }
                k if k & REP_ERR_BIT != 0 => {
                    assert!(
                        export.is_none(),
                        "expected no error after NBD_INFO_EXPORT was sent"
                    );
                    return Err(r);
                }
                k => panic!("expected REP_INFO/REP_ACK/error for option {opt}, got {k:#x}"),
            }
        }
        assert!(
            export.is_some(),
            "expected NBD_INFO_EXPORT before REP_ACK for option {opt} on '{name}'"
        );
        Ok(e)
    }

    fn go(&mut self, name: &str) -> Export {
        self.info_or_go(OPT_GO, name).unwrap_or_else(|r| {
            panic!(
                "expected NBD_OPT_GO '{name}' to succeed, got {:#x}: {}",
                r.kind,
                r.message()
            )
        })
    }

    /// LIST: the export names, in the order sent.
    fn list(&mut self) -> Vec<String> {
        self.send_option(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let r = self.option_reply();
            assert_eq!(r.opt, OPT_LIST, "expected replies to echo NBD_OPT_LIST");
            match r.kind {
                REP_ACK => return names,
                REP_SERVER => {
                    assert!(r.data.len() >= 4, "expected a name length in REP_SERVER");
                    let n = be_u32(&r.data) as usize;
                    assert!(
                        n <= r.data.len() - 4,
                        "expected REP_SERVER name length {n} to fit its {} bytes",
                        r.data.len()
                    );
                    names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
                }
                k => panic!("expected REP_SERVER or REP_ACK for NBD_OPT_LIST, got {k:#x}"),
            }
        }
    }

    /// NBD_OPT_ABORT: the server acknowledges and closes.
    fn abort(mut self) {
        self.send_option(OPT_ABORT, &[]);
        let r = self.option_reply();
        assert_eq!(
            (r.opt, r.kind),
            (OPT_ABORT, REP_ACK),
            "expected REP_ACK for NBD_OPT_ABORT"
        );
        let rest = self.expect_closed("after NBD_OPT_ABORT");
        assert!(rest.is_empty(), "expected nothing after the ABORT ack");
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    fn send_request(
        &mut self,
        flags: u16,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = request_header(flags, cmd, handle, offset, len);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// A simple reply header: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        let h = self.recv(16, "simple reply");
        assert_eq!(
            be_u32(&h),
            SIMPLE_REPLY_MAGIC,
            "expected simple reply magic"
        );
        (be_u32(&h[4..]), be_u64(&h[8..]))
    }

    /// One request without payload; its reply must carry our handle.
    fn command(&mut self, flags: u16, cmd: u16, offset: u64, len: u32) -> u32 {
        let h = self.handle();
        self.send_request(flags, cmd, h, offset, len, &[]);
        let (err, rh) = self.reply();
        assert_eq!(rh, h, "expected the reply to echo the request handle");
        err
    }

    fn read_flags(&mut self, flags: u16, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let h = self.handle();
        self.send_request(flags, CMD_READ, h, offset, len, &[]);
        let (err, rh) = self.reply();
        assert_eq!(rh, h, "expected the READ reply to echo the request handle");
        if err != 0 {
            return Err(err);
        }
        Ok(self.recv(len as usize, "READ data"))
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.read_flags(0, offset, len)
    }

    fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.read(offset, len).unwrap_or_else(|e| {
            panic!("expected READ {len} bytes at {offset} to succeed, got error {e}")
        })
    }

    fn write_flags(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        let h = self.handle();
        self.send_request(flags, CMD_WRITE, h, offset, data.len() as u32, data);
        let (err, rh) = self.reply();
        assert_eq!(rh, h, "expected the WRITE reply to echo the request handle");
        err
    }

    fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let e = self.write_flags(0, offset, data);
        assert_eq!(
            e,
            0,
            "expected WRITE {} bytes at {offset} to succeed",
            data.len()
        );
    }

    /// Reads until the server closes; returns what it sent first. Fails if the connection
    /// is still open after [`IO_TIMEOUT`].
    fn expect_closed(&mut self, what: &str) -> Vec<u8> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                    ) =>
                {
                    return got
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!(
                    "expected the daemon to close the connection {what}, but it stayed open ({e}); it sent {} bytes",
                    got.len()
                ),
            }
            assert!(
                Instant::now() < deadline,
                "expected the daemon to close the connection {what}, but it kept sending ({} bytes)",
                got.len()
            );
        }
    }

    /// NBD_CMD_DISC: the server closes without replying.
    fn disconnect(mut self) {
        let h = self.handle();
        self.send_request(0, CMD_DISC, h, 0, 0, &[]);
        let rest = self.expect_closed("after NBD_CMD_DISC");
        assert!(
            rest.is_empty(),
            "expected no reply to NBD_CMD_DISC, got {} bytes",
            rest.len()
        );
    }
}

/// Parses `bytes` as exactly one option reply.
fn single_option_reply(bytes: &[u8], what: &str) -> OptReply {
    assert!(
        bytes.len() >= 20,
        "expected an option reply {what}, got {} bytes",
        bytes.len()
    );
    assert_eq!(
        be_u64(bytes),
        REPLY_MAGIC,
        "expected option reply magic {what}"
    );
    let len = be_u32(&bytes[16..]) as usize;
    assert_eq!(
        bytes.len(),
        20 + len,
        "expected exactly one option reply {what}"
    );
    OptReply {
        opt: be_u32(&bytes[8..]),
        kind: be_u32(&bytes[12..]),
        data: bytes[20..].to_vec(),
    }
}

/// Value of a metric that must exist.
fn metric_value(d: &Daemon, name: &str) -> f64 {
    let text = d.metrics();
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(name))
                .then(|| it.next()?.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("expected metric {name} in /metrics:\n{text}"))
}

fn connection_errors(d: &Daemon) -> f64 {
    metric_value(d, ERRORS_METRIC)
}

/// Waits until the daemon has finished with every NBD connection (their error accounting
/// happens just before the open-connections gauge drops).
fn wait_no_connections(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = metric_value(d, OPEN_CONNS_METRIC);
        if open == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected the daemon to close all NBD connections within 20s, {open} still open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon survived: still running, `tandemctl status` answers, and exactly
/// `new_errors` connections were counted as dropped since `errors_before`.
fn assert_daemon_healthy(d: &mut Daemon, errors_before: f64, new_errors: u32, attached: u64) {
    wait_no_connections(d);
    assert!(
        d.is_running(),
        "expected tandemd to still be running; log:\n{}",
        d.log()
    );
    let st = d.ctl_json(&["status"]);
    assert_eq!(
        st["status"].as_str(),
        Some("online"),
        "expected tandemctl status to report online: {st}"
    );
    assert_eq!(
        st["attached_count"].as_u64(),
        Some(attached),
        "expected tandemctl status to report {attached} attached volume(s): {st}"
    );
    let counted = connection_errors(d) - errors_before;
    assert_eq!(
        counted,
        f64::from(new_errors),
        "expected {ERRORS_METRIC} to grow by exactly {new_errors} (one per connection the daemon had to drop)"
    );
}

fn start_with_volume(name: &str) -> Daemon {
    let d = Daemon::start(DaemonOpts::default());
    d.create_attached(name, "64MiB");
    d
}

#[test]
fn garbage_after_greeting_closes_only_that_connection() {
    let mut d = start_with_volume("vol");
    let uri = d.nbd_uri("vol");
    let errors0 = connection_errors(&d);

    // A well-behaved client sits in the transmission phase throughout.
    let (mut good, _) = Client::open(&d, "vol");
    let before = pattern(1, 4096);
    good.write_ok(0, &before);

    // An HTTP client where the NBD client flags should be.
    let mut c = Client::connect(&d);
    c.send_lossy(b"GET / HTTP/1.1\r\nHost: tandem\r\n\r\n");
    let got = c.expect_closed("after an HTTP request instead of client flags");
    assert!(got.is_empty(), "expected no reply to garbage, got {got:?}");

    // Valid client flags, then garbage instead of an option header.
    let mut c = Client::handshake(&d);
    c.send_lossy(&[0xa5; 64]);
    let got = c.expect_closed("after garbage instead of IHAVEOPT");
    assert!(got.is_empty(), "expected no reply to garbage, got {got:?}");

    // One good option, then an option with the magic byte-swapped.
    let mut c = Client::handshake(&d);
    assert_eq!(
        c.list(),
        vec!["vol".to_string()],
        "expected LIST to show 'vol'"
    );
    let mut bad = option_bytes(OPT_LIST, 0, &[]);
    bad[..8].copy_from_slice(&IHAVEOPT.swap_bytes().to_be_bytes());
    c.send_lossy(&bad);
    let got = c.expect_closed("after an option with a bad magic");
    assert!(got.is_empty(), "expected no reply to a bad option magic");

    // Half an option header, then the client goes away.
    let mut c = Client::handshake(&d);
    c.send(&IHAVEOPT.to_be_bytes()[..6]);
    c.s.shutdown(Shutdown::Write).expect("half-close");
    let got = c.expect_closed("after a truncated option header");
    assert!(got.is_empty(), "expected no reply to a truncated option");

    // The client that was there all along still works.
    assert_same(
        &good.read_ok(0, 4096),
        &before,
        "data read on the good connection",
    );
    good.write_ok(4096, &pattern(2, 4096));
    good.disconnect();

    // And so does a real client.
    qemu_io_ok(&uri, &["write -P 0x11 0 64k", "read -P 0x11 0 64k"]);
    assert_daemon_healthy(&mut d, errors0, 4, 1);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    for flags in [
        1u32 << 2,
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | (1 << 31),
        u32::MAX,
    ] {
        let mut c = Client::connect(&d);
        c.send_lossy(&flags.to_be_bytes());
        // Follow with a valid LIST: a server that ignored the flags would answer it.
        c.send_lossy(&option_bytes(OPT_LIST, 0, &[]));
        let got = c.expect_closed(&format!("after client flags {flags:#x}"));
        assert!(
            got.is_empty(),
            "expected no reply after unknown client flags {flags:#x}, got {} bytes",
            got.len()
        );
    }
    // Known flags alone are fine, including without NO_ZEROES.
    let mut c = Client::connect(&d);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let e = c.go("vol");
    assert_eq!(
        e.size, VOL_SIZE,
        "expected the export size after plain FIXED_NEWSTYLE"
    );
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 3, 1);
}

#[test]
fn oversized_option_length_gets_err_too_big_and_close() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    for (opt, len) in [
        (OPT_GO, 0xffff_fff0u32),
        (OPT_LIST, MAX_OPTION_BYTES + 1),
        (0x4242, u32::MAX),
    ] {
        let mut c = Client::handshake(&d);
        // Only the header: the daemon must not wait for (or allocate) 4 GiB.
        c.send(&option_bytes(opt, len, &[]));
        let what = format!("for option {opt} with length {len:#x}");
        let got = c.expect_closed(&what);
        let r = single_option_reply(&got, &what);
        assert_eq!(
            r.opt, opt,
            "expected NBD_REP_ERR_TOO_BIG to echo the option"
        );
        assert_eq!(
            r.kind, REP_ERR_TOO_BIG,
            "expected NBD_REP_ERR_TOO_BIG {what}, got {:#x}",
            r.kind
        );
    }
    // Exactly the limit is accepted (as an unsupported option) and the client goes on.
    let mut c = Client::handshake(&d);
    let r = c.expect_option_error(0x4242, &vec![7u8; MAX_OPTION_BYTES as usize], REP_ERR_UNSUP);
    assert!(
        !r.data.is_empty(),
        "expected an error message with ERR_UNSUP"
    );
    let e = c.go("vol");
    assert_eq!(
        e.size, VOL_SIZE,
        "expected GO to work after a maximal option"
    );
    c.read_ok(0, 4096);
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 3, 1);
}

#[test]
fn more_than_max_options_closes_the_connection() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);

    // MAX_OPTIONS - 1 refused options, then GO as the last allowed option: served.
    let mut c = Client::handshake(&d);
    for i in 0..MAX_OPTIONS - 1 {
        c.expect_option_error(0x1000 + i as u32, b"x", REP_ERR_UNSUP);
    }
    let e = c.go("vol");
    assert_eq!(
        e.size, VOL_SIZE,
        "expected the 128th option (GO) to be served"
    );
    c.read_ok(0, 512);
    c.disconnect();

    // MAX_OPTIONS refused options: the next one is never answered.
    let mut c = Client::handshake(&d);
    for i in 0..MAX_OPTIONS {
        c.expect_option_error(0x1000 + i as u32, b"x", REP_ERR_UNSUP);
    }
    c.send_lossy(&option_bytes(OPT_GO, 0, &[]));
    let got = c.expect_closed("after more than MAX_OPTIONS options");
    assert!(
        got.is_empty(),
        "expected no reply to option {} , got {} bytes",
        MAX_OPTIONS + 1,
        got.len()
    );
    assert_daemon_healthy(&mut d, errors0, 1, 1);
}

#[test]
fn info_and_go_for_unknown_or_detached_export_reply_err_unknown() {
    let mut d = start_with_volume("vol");
    d.ctl_ok(&["volume", "create", "cold", "--size", "16MiB"]);
    let errors0 = connection_errors(&d);

    let mut c = Client::handshake(&d);
    for opt in [OPT_INFO, OPT_GO] {
        for name in ["nosuch", "cold", ""] {
            let r = c.info_or_go(opt, name).err().unwrap_or_else(|| {
                panic!("expected option {opt} for export '{name}' to be refused")
            });
            assert_eq!(
                r.kind,
                REP_ERR_UNKNOWN,
                "expected NBD_REP_ERR_UNKNOWN for option {opt} on '{name}', got {:#x}: {}",
                r.kind,
                r.message()
            );
            if name == "cold" {
                assert!(
                    r.message().contains("tandemctl volume attach cold"),
                    "expected the refusal of a detached volume to say how to attach it, got: {}",
                    r.message()
                );
            }
            if name == "nosuch" {
                assert!(
                    r.message().contains("nosuch"),
                    "expected the refusal to name the export, got: {}",
                    r.message()
                );
            }
        }
    }

    // Malformed INFO/GO requests are refused as invalid, not fatal.
    let good = info_request("vol");
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 1);
    let mut padded = good.clone();
    padded.push(0);
    let mut lying = good.clone();
    lying[..4].copy_from_slice(&1000u32.to_be_bytes());
    for (what, data) in [
        ("truncated", truncated),
        ("padded", padded),
        ("name length past the end", lying),
        ("empty", Vec::new()),
    ] {
        let r = c.expect_option_error(OPT_GO, &data, REP_ERR_INVALID);
        assert!(
            !r.data.is_empty(),
            "expected an error message for a {what} GO request"
        );
    }

    // The same connection is still in option haggling: INFO then GO on the real volume.
    let info = c
        .info_or_go(OPT_INFO, "vol")
        .unwrap_or_else(|r| panic!("expected INFO 'vol' to succeed: {}", r.message()));
    assert_eq!(info.size, VOL_SIZE, "expected INFO to report 64 MiB");
    let e = c.go("vol");
    assert_eq!(e.size, VOL_SIZE, "expected GO to report 64 MiB");
    let data = pattern(3, 8192);
    c.write_ok(8192, &data);
    assert_same(&c.read_ok(8192, 8192), &data, "read after refused options");
    c.disconnect();

    // A refused-only session can still leave politely.
    let mut c = Client::handshake(&d);
    assert!(
        c.info_or_go(OPT_GO, "cold").is_err(),
        "expected GO 'cold' to be refused"
    );
    c.abort();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

#[test]
fn export_name_serves_attached_volumes_and_drops_unknown_ones() {
    let mut d = start_with_volume("vol");
    d.ctl_ok(&["volume", "create", "cold", "--size", "16MiB"]);
    let errors0 = connection_errors(&d);

    // Old-style selection, without NO_ZEROES: size, flags and 124 zero bytes.
    let mut c = Client::connect(&d);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send_option(OPT_EXPORT_NAME, b"vol");
    let r = c.recv(8 + 2 + 124, "EXPORT_NAME reply");
    assert_eq!(be_u64(&r), VOL_SIZE, "expected the export size");
    assert_ne!(
        be_u16(&r[8..]) & TFLAG_HAS_FLAGS,
        0,
        "expected HAS_FLAGS in transmission flags"
    );
    assert!(
        r[10..].iter().all(|&b| b == 0),
        "expected 124 zero bytes without NO_ZEROES"
    );
    let data = pattern(4, 4096);
    c.write_ok(0, &data);
    assert_same(&c.read_ok(0, 4096), &data, "read after EXPORT_NAME");
    c.disconnect();

    // EXPORT_NAME has no error reply: refusing means closing.
    for name in ["cold", "nosuch"] {
        let mut c = Client::handshake(&d);
        c.send_option(OPT_EXPORT_NAME, name.as_bytes());
        let got = c.expect_closed(&format!("after EXPORT_NAME '{name}'"));
        assert!(
            got.is_empty(),
            "expected no reply to EXPORT_NAME '{name}', got {} bytes",
            got.len()
        );
    }
    assert_daemon_healthy(&mut d, errors0, 2, 1);
}

#[test]
fn list_shows_attached_volumes_and_unsupported_options_get_err_unsup() {
    let mut d = Daemon::start(DaemonOpts::default());
    d.create_attached("alpha", "64MiB");
    d.create_attached("beta", "32MiB");
    d.ctl_ok(&["volume", "create", "cold", "--size", "16MiB"]);
    let errors0 = connection_errors(&d);

    let mut c = Client::handshake(&d);
    let mut names = c.list();
    names.sort();
    assert_eq!(
        names,
        vec!["alpha".to_string(), "beta".to_string()],
        "expected LIST to show exactly the attached volumes"
    );
    c.expect_option_error(OPT_LIST, b"junk", REP_ERR_INVALID);

    for (opt, data) in [
        (OPT_STARTTLS, Vec::new()),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_LIST_META_CONTEXT, info_request("alpha")),
        (OPT_SET_META_CONTEXT, b"\0\0\0\x0fbase:allocation".to_vec()),
        (0xdead_beef, vec![0xff; 100]),
        (0, Vec::new()),
    ] {
        let r = c.expect_option_error(opt, &data, REP_ERR_UNSUP);
        assert!(
            !r.data.is_empty(),
            "expected an error message with NBD_REP_ERR_UNSUP for option {opt}"
        );
    }
    // LIST still works after all that, and GO completes the handshake.
    assert_eq!(c.list().len(), 2, "expected LIST to still work");
    let e = c.go("beta");
    assert_eq!(e.size, 32 << 20, "expected GO 'beta' to report 32 MiB");
    assert_eq!(
        e.name.as_deref(),
        Some("beta"),
        "expected NBD_INFO_NAME 'beta'"
    );
    assert!(
        e.description.as_deref().is_some_and(|s| !s.is_empty()),
        "expected a non-empty NBD_INFO_DESCRIPTION"
    );
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES;
    assert_eq!(
        e.flags & want,
        want,
        "expected HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES in {:#x}",
        e.flags
    );
    assert_eq!(
        e.flags & TFLAG_READ_ONLY,
        0,
        "expected a writable export, flags {:#x}",
        e.flags
    );
    assert_ne!(
        e.flags & TFLAG_CAN_MULTI_CONN,
        0,
        "expected CAN_MULTI_CONN, flags {:#x}",
        e.flags
    );
    assert_eq!(
        e.block_sizes,
        Some((1, 4096, MAX_IO_BYTES)),
        "expected block sizes (min 1, preferred 4096, max 32 MiB)"
    );
    let data = pattern(5, 65536);
    c.write_ok(0, &data);
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0),
        0,
        "expected FLUSH to succeed"
    );
    assert_same(&c.read_ok(0, 65536), &data, "read after GO");
    c.disconnect();

    let mut c = Client::handshake(&d);
    c.expect_option_error(OPT_STARTTLS, &[], REP_ERR_UNSUP);
    c.abort();
    assert_daemon_healthy(&mut d, errors0, 0, 2);
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let data = pattern(6, 4096);
    for magic in [SIMPLE_REPLY_MAGIC, 0, REQUEST_MAGIC.swap_bytes()] {
        let (mut c, _) = Client::open(&d, "vol");
        c.write_ok(0, &data);
        // A write with a bad magic: it must neither be answered nor applied.
        let mut req = request_header_with_magic(magic, 0, CMD_WRITE, 0xbad, 0, 4096);
        req.extend_from_slice(&[0xee; 4096]);
        c.send_lossy(&req);
        let got = c.expect_closed(&format!("after request magic {magic:#x}"));
        assert!(
            got.is_empty(),
            "expected no reply to a request with magic {magic:#x}, got {} bytes",
            got.len()
        );
    }
    let (mut c, _) = Client::open(&d, "vol");
    assert_same(
        &c.read_ok(0, 4096),
        &data,
        "data after requests with bad magic",
    );
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 3, 1);
}

#[test]
fn out_of_range_reads_get_einval_and_the_connection_continues() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let (mut c, e) = Client::open(&d, "vol");
    let size = e.size;
    assert_eq!(size, VOL_SIZE, "expected a 64 MiB export");
    let tail = pattern(7, 4096);
    c.write_ok(size - 4096, &tail);
    for (offset, len) in [
        (size, 1u32),
        (size - 4096, 8192),
        (size - 1, 2),
        (size + (1 << 20), 4096),
        (u64::MAX - 511, 4096),
        (u64::MAX, 1),
    ] {
        assert_eq!(
            c.read(offset, len),
            Err(EINVAL),
            "expected EINVAL for READ {len} bytes at {offset:#x} (export is {size} bytes)"
        );
        // No data followed the error: the next reply parses and the tail is intact.
        assert_same(
            &c.read_ok(size - 4096, 4096),
            &tail,
            "last block after an out-of-range read",
        );
    }
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

#[test]
fn out_of_range_writes_get_enospc_after_the_payload_is_consumed() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let (mut c, e) = Client::open(&d, "vol");
    let size = e.size;
    let head = pattern(8, 4096);
    let tail = pattern(9, 4096);
    c.write_ok(0, &head);
    c.write_ok(size - 4096, &tail);

    // A payload made of request headers: if the daemon parsed it as requests, it would
    // zero block 0 and send replies with handle 0xbad.
    let mut decoy = Vec::new();
    while decoy.len() + 28 <= 8192 {
        decoy.extend_from_slice(&request_header(0, CMD_WRITE_ZEROES, 0xbad, 0, 4096));
    }
    decoy.resize(8192, 0);

    for (offset, payload) in [
        (size - 4096, decoy.clone()),
        (size, pattern(10, 4096)),
        (size - 1, vec![0x99; 2]),
        (u64::MAX - 4095, decoy[..4096].to_vec()),
    ] {
        assert_eq!(
            c.write_flags(0, offset, &payload),
            ENOSPC,
            "expected ENOSPC for WRITE {} bytes at {offset:#x}",
            payload.len()
        );
        assert_same(
            &c.read_ok(size - 4096, 4096),
            &tail,
            "last block after a refused write (no partial write)",
        );
    }
    // Zeroing and trimming past the end are refused too, and do not touch the tail.
    for cmd in [CMD_WRITE_ZEROES, CMD_TRIM] {
        let err = c.command(0, cmd, size - 4096, 8192);
        assert!(
            err == ENOSPC || err == EINVAL,
            "expected ENOSPC or EINVAL for command {cmd} past the end, got {err}"
        );
    }
    assert_same(
        &c.read_ok(size - 4096, 4096),
        &tail,
        "last block after refused zeroing",
    );
    assert_same(
        &c.read_ok(0, 4096),
        &head,
        "block 0 (target of the decoy requests)",
    );
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

#[test]
fn oversized_read_gets_eoverflow_and_the_connection_continues() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let (mut c, _) = Client::open(&d, "vol");
    let data = pattern(11, 65536);
    c.write_ok(0, &data);
    // Exactly the maximum is served.
    let big = c.read_ok(0, MAX_IO_BYTES);
    assert_same(&big[..65536], &data, "start of a maximal read");
    assert!(
        big[65536..].iter().all(|&b| b == 0),
        "expected zeros in the never-written rest of a maximal read"
    );
    for len in [MAX_IO_BYTES + 1, u32::MAX] {
        let r = c.read(0, len);
        assert!(
            r == Err(EOVERFLOW) || r == Err(EINVAL),
            "expected EOVERFLOW or EINVAL for a {len}-byte READ, got {:?}",
            r.as_ref().map(|v| v.len())
        );
        assert_same(&c.read_ok(0, 65536), &data, "read after an oversized read");
    }
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

#[test]
fn oversized_write_is_refused_and_closes_the_connection() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let (mut c, _) = Client::open(&d, "vol");
    // Exactly the maximum is accepted.
    let data = pattern(12, MAX_IO_BYTES as usize);
    c.write_ok(0, &data);
    // One byte more: refused. Only the header is sent; the daemon must not wait for 32 MiB.
    let h = 0x0bad_cafe;
    c.send_request(0, CMD_WRITE, h, 0, MAX_IO_BYTES + 1, &[]);
    let got = c.expect_closed("after a WRITE larger than the maximum");
    if !got.is_empty() {
        assert_eq!(
            got.len(),
            16,
            "expected at most one simple reply, got {got:?}"
        );
        assert_eq!(
            be_u32(&got),
            SIMPLE_REPLY_MAGIC,
            "expected simple reply magic"
        );
        let err = be_u32(&got[4..]);
        assert!(
            err == EOVERFLOW || err == EINVAL,
            "expected EOVERFLOW or EINVAL for an oversized WRITE, got {err}"
        );
        assert_eq!(
            be_u64(&got[8..]),
            h,
            "expected the reply to echo the handle"
        );
    }
    let (mut c, _) = Client::open(&d, "vol");
    assert_same(
        &c.read_ok(0, MAX_IO_BYTES),
        &data,
        "data after a refused oversized write",
    );
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 1, 1);
}

#[test]
fn unknown_commands_get_einval_and_the_connection_continues() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let (mut c, _) = Client::open(&d, "vol");
    let data = pattern(13, 4096);
    c.write_ok(0, &data);
    for cmd in [CMD_CACHE, CMD_BLOCK_STATUS, 99, 0xffff] {
        assert_eq!(
            c.command(0, cmd, 0, 4096),
            EINVAL,
            "expected EINVAL for unknown command {cmd}"
        );
        assert_same(&c.read_ok(0, 4096), &data, "read after an unknown command");
    }
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

#[test]
fn unknown_command_flags_get_einval_and_nothing_is_applied() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let (mut c, _) = Client::open(&d, "vol");
    let data = pattern(14, 8192);
    c.write_ok(0, &data);

    // DF was not negotiated (no structured replies); bit 12 means nothing.
    for flags in [1u16 << 12, CMD_FLAG_DF, 0x8000] {
        assert_eq!(
            c.read_flags(flags, 0, 4096),
            Err(EINVAL),
            "expected EINVAL for READ with flags {flags:#x}"
        );
    }
    assert_eq!(
        c.write_flags(1 << 12, 0, &[0x5a; 8192]),
        EINVAL,
        "expected EINVAL for WRITE with unknown flag bit 12"
    );
    assert_eq!(
        c.command(1 << 15, CMD_FLUSH, 0, 0),
        EINVAL,
        "expected EINVAL for FLUSH with flag bit 15"
    );
    assert_eq!(
        c.command(1 << 5, CMD_WRITE_ZEROES, 0, 4096),
        EINVAL,
        "expected EINVAL for WRITE_ZEROES with flag bit 5"
    );
    assert_eq!(
        c.command(CMD_FLAG_NO_HOLE, CMD_TRIM, 4096, 4096),
        EINVAL,
        "expected EINVAL for TRIM with NO_HOLE (only valid on WRITE_ZEROES)"
    );
    assert_same(
        &c.read_ok(0, 8192),
        &data,
        "data after requests with bad flags (none applied)",
    );

    // The documented flags work.
    let fua = pattern(15, 4096);
    assert_eq!(
        c.write_flags(CMD_FLAG_FUA, 16384, &fua),
        0,
        "expected WRITE+FUA to succeed"
    );
    assert_same(&c.read_ok(16384, 4096), &fua, "data after WRITE+FUA");
    assert_eq!(
        c.command(
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_WRITE_ZEROES,
            4096,
            4096
        ),
        0,
        "expected WRITE_ZEROES with FUA|NO_HOLE to succeed"
    );
    assert_eq!(
        c.command(CMD_FLAG_FUA, CMD_TRIM, 16384, 4096),
        0,
        "expected TRIM+FUA to succeed"
    );
    let after = c.read_ok(0, 20480);
    assert_same(
        &after[..4096],
        &data[..4096],
        "block 0 after zeroing block 1",
    );
    assert!(
        after[4096..8192].iter().all(|&b| b == 0),
        "expected block 1 to read zeros after WRITE_ZEROES"
    );
    assert!(
        after[16384..].iter().all(|&b| b == 0),
        "expected block 4 to read zeros after TRIM"
    );
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

/// The spec (proto.md, "Command flags"): FUA "is valid for all commands, provided
/// NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST accept all commands
/// with this bit set (even by ignoring the bit)", noting that existing clients set it on
/// FLUSH and READ.
#[test]
fn fua_flag_is_accepted_on_every_command() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let (mut c, e) = Client::open(&d, "vol");
    assert_ne!(
        e.flags & TFLAG_SEND_FUA,
        0,
        "expected SEND_FUA to be advertised"
    );
    let data = pattern(16, 4096);
    c.write_ok(0, &data);
    assert_eq!(
        c.read_flags(CMD_FLAG_FUA, 0, 4096).map(|v| v == data),
        Ok(true),
        "expected READ+FUA to succeed with the data"
    );
    assert_eq!(
        c.command(CMD_FLAG_FUA, CMD_FLUSH, 0, 0),
        0,
        "expected FLUSH+FUA to succeed"
    );
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

#[test]
fn abrupt_close_mid_write_payload_applies_nothing() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let base = 1u64 << 20;
    let old = pattern(17, 128 << 10);
    let (mut c, _) = Client::open(&d, "vol");
    c.write_ok(base, &old);
    c.disconnect();

    // A 64 KiB write whose payload stops half way, then the client vanishes.
    let (mut c, _) = Client::open(&d, "vol");
    let new = pattern(18, 64 << 10);
    c.send_request(0, CMD_WRITE, 1, base, new.len() as u32, &new[..32 << 10]);
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    wait_no_connections(&d);

    let (mut c, _) = Client::open(&d, "vol");
    assert_same(
        &c.read_ok(base, 128 << 10),
        &old,
        "region after a write whose payload was cut off (no partial write)",
    );
    c.disconnect();
    // qemu sees the same.
    qemu_io_ok(
        &d.nbd_uri("vol"),
        &[
            "read -P 0x00 0 1M",
            "write -P 0x33 1M 4k",
            "read -P 0x33 1M 4k",
        ],
    );
    assert_daemon_healthy(&mut d, errors0, 1, 1);
}

#[test]
fn requests_after_disc_are_not_processed() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let target = 2u64 << 20;
    let old = pattern(19, 64 << 10);
    let (mut c, _) = Client::open(&d, "vol");
    c.write_ok(target, &old);

    // Writes in flight when DISC arrives are completed and answered before the close.
    let base = 4u64 << 20;
    let mut burst = Vec::new();
    let mut handles = HashSet::new();
    for i in 0..16u64 {
        let h = 0xd15c_0000 + i;
        handles.insert(h);
        burst.extend_from_slice(&request_header(0, CMD_WRITE, h, base + i * 65536, 65536));
        burst.extend_from_slice(&pattern(100 + i, 65536));
    }
    burst.extend_from_slice(&request_header(0, CMD_DISC, 0xd15c_ffff, 0, 0));
    c.send(&burst);
    for _ in 0..16 {
        let (err, h) = c.reply();
        assert_eq!(err, 0, "expected writes before DISC to succeed");
        assert!(
            handles.remove(&h),
            "expected one reply per write before DISC, got unexpected handle {h:#x}"
        );
    }
    let got = c.expect_closed("after DISC");
    assert!(
        got.is_empty(),
        "expected nothing after the replies and DISC"
    );

    // A write sent right behind DISC is neither answered nor applied.
    let (mut c, _) = Client::open(&d, "vol");
    let mut b = request_header(0, CMD_DISC, 1, 0, 0);
    b.extend_from_slice(&request_header(0, CMD_WRITE, 2, target, 65536));
    b.extend_from_slice(&pattern(20, 65536));
    b.extend_from_slice(&request_header(0, CMD_FLUSH, 3, 0, 0));
    c.send_lossy(&b);
    let got = c.expect_closed("after DISC followed by a WRITE");
    assert!(
        got.is_empty(),
        "expected no reply to requests after DISC, got {} bytes",
        got.len()
    );

    let (mut c, _) = Client::open(&d, "vol");
    assert_same(
        &c.read_ok(target, 64 << 10),
        &old,
        "region targeted by a write sent after DISC",
    );
    for i in 0..16u64 {
        assert_same(
            &c.read_ok(base + i * 65536, 65536),
            &pattern(100 + i, 65536),
            "write that was in flight when DISC arrived",
        );
    }
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

/// Sends `n` pipelined 64 KiB writes then `n` pipelined reads at `base`, matching replies
/// by handle.
fn pipelined_round(c: &mut Client, base: u64, n: u64, seed: u64) {
    const LEN: u32 = 64 << 10;
    let tag = seed << 32;
    let mut burst = Vec::new();
    for i in 0..n {
        let flags = if i % 8 == 0 { CMD_FLAG_FUA } else { 0 };
        burst.extend_from_slice(&request_header(
            flags,
            CMD_WRITE,
            tag | i,
            base + i * u64::from(LEN),
            LEN,
        ));
        burst.extend_from_slice(&pattern(seed * 1000 + i, LEN as usize));
    }
    c.send(&burst);
    let mut pending: HashSet<u64> = (0..n).map(|i| tag | i).collect();
    for _ in 0..n {
        let (err, h) = c.reply();
        assert_eq!(err, 0, "expected pipelined write {h:#x} to succeed");
        assert!(
            pending.remove(&h),
            "expected each write handle answered once, got {h:#x}"
        );
    }

    let mut burst = Vec::new();
    let mut pending: HashMap<u64, u64> = HashMap::new();
    for i in 0..n {
        let h = tag | (1 << 31) | i;
        pending.insert(h, i);
        burst.extend_from_slice(&request_header(
            0,
            CMD_READ,
            h,
            base + i * u64::from(LEN),
            LEN,
        ));
    }
    c.send(&burst);
    for _ in 0..n {
        let (err, h) = c.reply();
        assert_eq!(err, 0, "expected pipelined read {h:#x} to succeed");
        let i = pending
            .remove(&h)
            .unwrap_or_else(|| panic!("expected each read handle answered once, got {h:#x}"));
        let data = c.recv(LEN as usize, "pipelined READ data");
        assert_same(
            &data,
            &pattern(seed * 1000 + i, LEN as usize),
            "pipelined read matched by handle",
        );
    }
}

#[test]
fn pipelined_requests_and_parallel_connections_complete_correctly() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);

    let (mut c, _) = Client::open(&d, "vol");
    pipelined_round(&mut c, 0, 64, 1);

    // More requests than the per-connection in-flight limit (128): back-pressure, not loss.
    let mut burst = Vec::new();
    for i in 0..300u64 {
        burst.extend_from_slice(&request_header(0, CMD_READ, i, (i % 64) * 65536, 4096));
    }
    c.send(&burst);
    let mut seen = HashSet::new();
    for _ in 0..300 {
        let (err, h) = c.reply();
        assert_eq!(err, 0, "expected read {h} of 300 to succeed");
        assert!(
            seen.insert(h) && h < 300,
            "expected each of 300 handles once, got {h}"
        );
        let data = c.recv(4096, "READ data");
        assert_same(
            &data,
            &pattern(1000 + h % 64, 65536)[..4096],
            "one of 300 pipelined reads",
        );
    }
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0),
        0,
        "expected FLUSH to succeed"
    );

    // Several connections at once, each pipelining on its own region.
    let dref = &d;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                s.spawn(move || {
                    let (mut c, _) = Client::open(dref, "vol");
                    pipelined_round(&mut c, (8 << 20) + t * (2 << 20), 16, 10 + t);
                    assert_eq!(
                        c.command(0, CMD_FLUSH, 0, 0),
                        0,
                        "expected FLUSH to succeed"
                    );
                    c.disconnect();
                })
            })
            .collect();
        for w in workers {
            if let Err(p) = w.join() {
                std::panic::resume_unwind(p);
            }
        }
    });
    // Every connection's writes are visible on another one.
    for t in 0..4u64 {
        for i in 0..16u64 {
            let off = (8 << 20) + t * (2 << 20) + i * 65536;
            assert_same(
                &c.read_ok(off, 65536),
                &pattern((10 + t) * 1000 + i, 65536),
                "data written by a parallel connection, read on the first",
            );
        }
    }
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 0, 1);
}

#[test]
fn concurrent_hostile_clients_do_not_disturb_a_good_one() {
    let mut d = start_with_volume("vol");
    let uri = d.nbd_uri("vol");
    let errors0 = connection_errors(&d);
    let rounds = 5u32;
    let dref = &d;
    std::thread::scope(|s| {
        let hostile = s.spawn(move || {
            for r in 0..rounds {
                // Garbage flags.
                let mut c = Client::connect(dref);
                c.send_lossy(&[0xff; 32]);
                c.expect_closed("after garbage client flags");
                // Oversized option.
                let mut c = Client::handshake(dref);
                c.send(&option_bytes(OPT_INFO, u32::MAX, &[]));
                c.expect_closed("after an oversized option");
                // Bad request magic.
                let (mut c, _) = Client::open(dref, "vol");
                c.send_lossy(&request_header_with_magic(
                    0x1234_5678,
                    0,
                    CMD_READ,
                    1,
                    0,
                    1,
                ));
                c.expect_closed("after a bad request magic");
                // Abrupt close mid-payload, away from the good client's region.
                let (mut c, _) = Client::open(dref, "vol");
                c.send_request(
                    0,
                    CMD_WRITE,
                    2,
                    (32 << 20) + u64::from(r) * 65536,
                    65536,
                    &[0xcc; 1000],
                );
                drop(c);
            }
        });
        for i in 0..rounds {
            let (mut c, _) = Client::open(dref, "vol");
            let data = pattern(200 + u64::from(i), 65536);
            let off = u64::from(i) * 65536;
            c.write_ok(off, &data);
            assert_same(
                &c.read_ok(off, 65536),
                &data,
                "good client's data under attack",
            );
            c.disconnect();
        }
        qemu_io_ok(&uri, &["write -P 0x42 1M 64k", "read -P 0x42 1M 64k"]);
        if let Err(p) = hostile.join() {
            std::panic::resume_unwind(p);
        }
    });
    let (mut c, _) = Client::open(&d, "vol");
    let hit = c.read_ok(32 << 20, 65536 * rounds);
    assert!(
        hit.iter().all(|&b| b == 0),
        "expected no byte of the cut-off writes to be stored"
    );
    c.disconnect();
    assert_daemon_healthy(&mut d, errors0, 4 * rounds, 1);
}

/// Waits for the daemon to drop a client that is still in the handshake, sending one more
/// byte of `trickle` every two seconds meanwhile; returns how long the close took.
fn time_until_dropped(mut c: Client, trickle: &[u8]) -> Duration {
    let start = Instant::now();
    let limit = HANDSHAKE_TIMEOUT + Duration::from_secs(15);
    c.s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("set read timeout");
    let mut sent = 0;
    let mut buf = [0u8; 64];
    loop {
        match c.s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(n) => panic!("expected no reply to a stalled handshake, got {n} bytes"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return start.elapsed(),
        }
        assert!(
            start.elapsed() < limit,
            "expected the daemon to drop a stalled handshake within {limit:?}"
        );
        if sent < trickle.len() && start.elapsed() >= Duration::from_secs(2 * (sent as u64 + 1)) {
            c.send_lossy(&trickle[sent..sent + 1]);
            sent += 1;
        }
    }
}

#[test]
#[ignore = "slow: waits out the 30 s handshake timeout; run with --ignored"]
fn stalled_handshakes_are_dropped_after_the_timeout() {
    let mut d = start_with_volume("vol");
    let errors0 = connection_errors(&d);
    let dref = &d;
    std::thread::scope(|s| {
        // Says nothing after the greeting.
        let silent = s.spawn(move || time_until_dropped(Client::connect(dref), &[]));
        // Trickles an option header one byte every 2 s, never completing it (slowloris).
        let slow = s.spawn(move || {
            time_until_dropped(Client::handshake(dref), &IHAVEOPT.to_be_bytes()[..6])
        });
        // Meanwhile, other clients are served normally.
        std::thread::sleep(Duration::from_secs(5));
        let (mut c, _) = Client::open(dref, "vol");
        let data = pattern(300, 4096);
        c.write_ok(0, &data);
        assert_same(
            &c.read_ok(0, 4096),
            &data,
            "data written during stalled handshakes",
        );
        c.disconnect();
        for (what, t) in [("silent", silent), ("slowloris", slow)] {
            let took = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            assert!(
                took >= HANDSHAKE_TIMEOUT - Duration::from_secs(1),
                "expected the {what} client to be kept until the handshake timeout, dropped after {took:?}"
            );
        }
    });
    assert_daemon_healthy(&mut d, errors0, 2, 1);
}
