//! A control server on a real Unix socket in a temporary folder, with socketpairs playing
//! the dm-user kernel: what the control-socket tests of both daemon modes share.

// Each test binary that includes `common` uses a part of this.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use snapuserd::daemon::control_server::{bind_listener, ControlServer, ServerExit};
use snapuserd::daemon::events::DaemonEvents;
use snapuserd::daemon::handlers::HandlerRegistry;
use snapuserd::daemon::transport::ChannelOpener;
use snapuserd::dm_user::{
    Channel, ChannelError, MessageHeader, DM_USER_REQ_MAP_READ, DM_USER_RESP_SUCCESS, HEADER_SIZE,
};

/// Hands each opened channel's "kernel" end to the test.
pub struct PairOpener(pub Mutex<Sender<(String, UnixStream)>>);

impl ChannelOpener for PairOpener {
    fn open(&self, misc: &str) -> Result<Channel, ChannelError> {
        let (kernel, daemon) = UnixStream::pair().map_err(|source| ChannelError::Io {
            op: "socketpair",
            source,
        })?;
        self.0
            .lock()
            .unwrap()
            .send((misc.to_string(), kernel))
            .unwrap();
        Ok(Channel::from_fd(daemon.into()))
    }
}

/// A control server running on its own thread.
pub struct TestDaemon {
    _tmp: tempfile::TempDir,
    /// The temporary folder (socket, COW files, images).
    pub dir: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// The registry the server serves.
    pub registry: Arc<HandlerRegistry>,
    /// The kernel end of each channel the daemon opens, with its misc name.
    pub kernels: Receiver<(String, UnixStream)>,
    thread: Option<JoinHandle<ServerExit>>,
}

impl TestDaemon {
    /// Serve the registry `build` makes (given the temporary folder and the channel opener).
    pub fn start(build: impl FnOnce(&Path, Box<dyn ChannelOpener>) -> HandlerRegistry) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let socket = dir.join("snapuserd");
        let (tx, rx) = mpsc::channel();
        let registry = Arc::new(build(&dir, Box::new(PairOpener(Mutex::new(tx)))));
        let mut server =
            ControlServer::new(bind_listener(&socket).unwrap(), Arc::clone(&registry)).unwrap();
        let thread = std::thread::spawn(move || server.run(&DaemonEvents::new().unwrap()).unwrap());
        Self {
            _tmp: tmp,
            dir,
            socket,
            registry,
            kernels: rx,
            thread: Some(thread),
        }
    }

    /// A new client connection.
    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).unwrap()
    }

    /// Wait for the server to end; how it ended.
    pub fn join(mut self) -> ServerExit {
        self.thread.take().unwrap().join().unwrap()
    }

    /// Send `stop`: no reply, the connection closes and the server ends.
    pub fn stop(self) {
        let mut c = self.connect();
        c.write_all(b"stop").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            c.read(&mut buf).unwrap(),
            0,
            "stop has no reply; the server closes"
        );
        assert_eq!(self.join(), ServerExit::StopCommand);
    }
}

/// Send one command and return the reply.
pub fn ask(s: &mut UnixStream, msg: impl AsRef<[u8]>) -> String {
    s.write_all(msg.as_ref()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// Read `len` bytes at `sector` through a kernel end: the response header, and the data
/// when it succeeded.
pub fn kernel_read(
    k: &mut UnixStream,
    seq: u64,
    sector: u64,
    len: u64,
) -> (MessageHeader, Vec<u8>) {
    let req = MessageHeader {
        seq,
        msg_type: DM_USER_REQ_MAP_READ,
        flags: 0,
        sector,
        len,
    };
    k.write_all(&req.to_bytes()).unwrap();
    let mut raw = [0u8; HEADER_SIZE];
    k.read_exact(&mut raw).unwrap();
    let resp = MessageHeader::from_bytes(&raw);
    let mut data = Vec::new();
    if resp.msg_type == DM_USER_RESP_SUCCESS {
        data.resize(len as usize, 0);
        k.read_exact(&mut data).unwrap();
    }
    (resp, data)
}
