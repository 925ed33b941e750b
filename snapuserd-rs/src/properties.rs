//! Setting Android system properties through init's property service, and reading them
//! (on Android only, through bionic).
//!
//! The daemon publishes two properties: `snapuserd.ready=true` once it serves its control
//! socket, and `snapuserd.proxy_ready=true` from the socket-handoff proxy once it listens.
//! It sets them the way bionic's `__system_property_set` does with the second protocol
//! version: a `SOCK_STREAM` connection to `/dev/socket/property_service`, one write of
//!
//! ```text
//! u32 PROP_MSG_SETPROP2 (0x00020001) | u32 name length | name | u32 value length | value
//! ```
//!
//! (native byte order, strings without a terminator), then a 4-byte `i32` result, 0 on
//! success. Every socket operation has a timeout, so a property service that never answers
//! cannot hang the daemon.
//!
//! Where the socket does not exist (a host, or Android's first stage before the property
//! service runs) [`set_property_if_available`] logs at debug level and carries on, as AOSP's
//! daemon does.

use std::io::{IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// init's property service socket.
pub const PROPERTY_SERVICE_SOCKET: &str = "/dev/socket/property_service";

/// Command word of the length-prefixed set request.
pub const PROP_MSG_SETPROP2: u32 = 0x0002_0001;

/// Result code of a successful set.
pub const PROP_SUCCESS: i32 = 0;

/// Values must be shorter than this (bionic's `PROP_VALUE_MAX`), except for `ro.` names.
pub const PROP_VALUE_MAX: usize = 92;

/// Longest property name accepted here (init refuses far shorter ones in practice).
pub const MAX_NAME_LEN: usize = 1024;

/// How long one connect, write or reply may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of setting a property.
#[derive(Debug, Error)]
pub enum PropertyError {
    /// The name is empty, too long, or has a character init refuses.
    #[error("property name {name:?} is not valid")]
    BadName {
        /// The name.
        name: String,
    },
    /// The value is too long for a non-`ro.` property, or has a NUL byte.
    #[error("value for property {name} is not valid ({len} bytes)")]
    BadValue {
        /// The property.
        name: String,
        /// Value length.
        len: usize,
    },
    /// A socket operation failed or timed out.
    #[error("property service {path}: {op} while setting {name}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The property.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The service answered with an error code.
    #[error("property service refused {name}={value}: error 0x{code:x}")]
    Refused {
        /// The property.
        name: String,
        /// The value.
        value: String,
        /// The code received.
        code: i32,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b':'))
}

/// Encode one set request. Refuses what init would refuse anyway, before connecting.
pub fn encode_set_request(name: &str, value: &str) -> Result<Vec<u8>, PropertyError> {
    if !valid_name(name) {
        return Err(PropertyError::BadName {
            name: name.to_string(),
        });
    }
    if (value.len() >= PROP_VALUE_MAX && !name.starts_with("ro.")) || value.contains('\0') {
        return Err(PropertyError::BadValue {
            name: name.to_string(),
            len: value.len(),
        });
    }
    let bad_value = || PropertyError::BadValue {
        name: name.to_string(),
        len: value.len(),
    };
    let name_len = u32::try_from(name.len()).map_err(|_| PropertyError::BadName {
        name: name.to_string(),
    })?;
    let value_len = u32::try_from(value.len()).map_err(|_| bad_value())?;
    let mut msg = Vec::with_capacity(12 + name.len() + value.len());
    msg.extend_from_slice(&PROP_MSG_SETPROP2.to_ne_bytes());
    msg.extend_from_slice(&name_len.to_ne_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(&value_len.to_ne_bytes());
    msg.extend_from_slice(value.as_bytes());
    Ok(msg)
}

/// Set `name` to `value` through the property service listening at `socket`.
pub fn set_property_at(socket: &Path, name: &str, value: &str) -> Result<(), PropertyError> {
    let msg = encode_set_request(name, value)?;
    let io = |op: &'static str| {
        let name = name.to_string();
        move |source: std::io::Error| PropertyError::Io {
            path: socket.to_path_buf(),
            op,
            name,
            source,
        }
    };
    let mut stream = UnixStream::connect(socket).map_err(io("connect"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io("set timeout"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io("set timeout"))?;
    // One write, as bionic does (init reads the request with its own short timeout).
    let mut sent = 0usize;
    while sent < msg.len() {
        let rest = msg.get(sent..).unwrap_or_default();
        match stream.write_vectored(&[IoSlice::new(rest)]) {
            Ok(0) => {
                return Err(io("write")(std::io::Error::from(
                    std::io::ErrorKind::WriteZero,
                )))
            }
            Ok(n) => sent = sent.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("write")(e)),
        }
    }
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).map_err(io("read reply"))?;
    let code = i32::from_ne_bytes(reply);
    if code != PROP_SUCCESS {
        return Err(PropertyError::Refused {
            name: name.to_string(),
            value: value.to_string(),
            code,
        });
    }
    log::debug!("property {name}={value} set");
    Ok(())
}

/// Set `name` to `value` if a property service listens at `socket`. A missing socket is
/// not an error (logged at debug level): there is no property service on a host or in
/// Android's first stage. Any other failure is returned.
pub fn set_property_if_available(
    socket: &Path,
    name: &str,
    value: &str,
) -> Result<(), PropertyError> {
    if std::fs::symlink_metadata(socket).is_err() {
        log::debug!(
            "no property service at {}; not setting {name}={value}",
            socket.display()
        );
        return Ok(());
    }
    set_property_at(socket, name, value)
}

/// The value of system property `name` (bionic's `__system_property_get`); `None` where it
/// is unset or empty, and always on a host (no property area).
#[cfg(target_os = "android")]
pub fn get_property(name: &str) -> Option<String> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut value = [0 as libc::c_char; PROP_VALUE_MAX];
    // SAFETY: `name` is NUL-terminated; `value` has PROP_VALUE_MAX bytes, the most
    // __system_property_get writes (terminator included).
    let len = unsafe { libc::__system_property_get(name.as_ptr(), value.as_mut_ptr()) };
    let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
    let bytes: Vec<u8> = value
        .iter()
        .take(len.min(PROP_VALUE_MAX))
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

/// The value of system property `name`: always `None` off Android (no property area).
#[cfg(not(target_os = "android"))]
pub fn get_property(name: &str) -> Option<String> {
    let _ = name;
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake property service: reads one request the way init does and answers `code`.
    fn fake_service(
        listener: UnixListener,
        code: i32,
    ) -> thread::JoinHandle<(u32, String, String)> {
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut word = [0u8; 4];
            s.read_exact(&mut word).unwrap();
            let cmd = u32::from_ne_bytes(word);
            let read_string = |s: &mut UnixStream| {
                let mut len = [0u8; 4];
                s.read_exact(&mut len).unwrap();
                let mut text = vec![0u8; u32::from_ne_bytes(len) as usize];
                s.read_exact(&mut text).unwrap();
                String::from_utf8(text).unwrap()
            };
            let name = read_string(&mut s);
            let value = read_string(&mut s);
            s.write_all(&code.to_ne_bytes()).unwrap();
            (cmd, name, value)
        })
    }

    #[test]
    fn request_bytes_are_bionics_setprop2_layout() {
        let msg = encode_set_request("snapuserd.ready", "true").unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&0x0002_0001u32.to_ne_bytes());
        want.extend_from_slice(&15u32.to_ne_bytes());
        want.extend_from_slice(b"snapuserd.ready");
        want.extend_from_slice(&4u32.to_ne_bytes());
        want.extend_from_slice(b"true");
        assert_eq!(msg, want);
        // An empty value is a bare zero length.
        let msg = encode_set_request("a.b", "").unwrap();
        assert_eq!(&msg[msg.len() - 4..], &0u32.to_ne_bytes());
    }

    #[test]
    fn bad_names_and_values_are_refused_before_connecting() {
        for name in ["", ".a", "a.", "a..b", "a b", "a/b", "a\0b"] {
            assert!(
                matches!(
                    encode_set_request(name, "x"),
                    Err(PropertyError::BadName { .. })
                ),
                "{name:?}"
            );
        }
        let long = "v".repeat(PROP_VALUE_MAX);
        assert!(matches!(
            encode_set_request("snapuserd.ready", &long),
            Err(PropertyError::BadValue { .. })
        ));
        assert!(encode_set_request("ro.long", &long).is_ok());
        assert!(encode_set_request("snapuserd.ready", &long[1..]).is_ok());
    }

    #[test]
    fn set_through_a_fake_property_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("property_service");
        let service = fake_service(UnixListener::bind(&path).unwrap(), PROP_SUCCESS);
        set_property_if_available(&path, "snapuserd.proxy_ready", "true").unwrap();
        let (cmd, name, value) = service.join().unwrap();
        assert_eq!(cmd, PROP_MSG_SETPROP2);
        assert_eq!(name, "snapuserd.proxy_ready");
        assert_eq!(value, "true");
    }

    #[test]
    fn a_refusal_is_an_error_with_the_code() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("property_service");
        let service = fake_service(UnixListener::bind(&path).unwrap(), 0x18);
        let err = set_property_at(&path, "snapuserd.ready", "true").unwrap_err();
        assert!(
            matches!(err, PropertyError::Refused { code: 0x18, .. }),
            "{err}"
        );
        service.join().unwrap();
    }

    #[test]
    fn a_service_that_closes_without_answering_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("property_service");
        let listener = UnixListener::bind(&path).unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        });
        let err = set_property_at(&path, "snapuserd.ready", "true").unwrap_err();
        assert!(
            matches!(
                err,
                PropertyError::Io {
                    op: "read reply",
                    ..
                }
            ),
            "{err}"
        );
        t.join().unwrap();
    }

    #[test]
    fn a_missing_service_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        set_property_if_available(&dir.path().join("absent"), "snapuserd.ready", "true").unwrap();
        assert!(set_property_at(&dir.path().join("absent"), "snapuserd.ready", "true").is_err());
    }
}
