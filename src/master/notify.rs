//! systemd's readiness protocol (`Type=notify`, sd_notify(3)), written by
//! hand: one datagram to the socket `$NOTIFY_SOCKET` names. `READY=1` once
//! every group has a worker serving, so `systemctl start` returns then and
//! fails if no worker could start; `RELOADING=1` (with `MONOTONIC_USEC=`)
//! when a reload starts and `READY=1` when it has ended, for
//! `Type=notify-reload`; `STOPPING=1` once when a stop begins; `STATUS=`
//! lines for `systemctl status`, fresh after every reload and scale. Without `NOTIFY_SOCKET`
//! (not under systemd, or another `Type=`) nothing is sent. Children never
//! see the variable (`sys::spawn` removes it): only the main process may
//! notify.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets.
pub(crate) const ENV: &str = "NOTIFY_SOCKET";

/// Where to send notifications, if systemd asked for them.
pub(crate) struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
    pub(crate) fn from_env() -> Option<Notifier> {
        let name = std::env::var_os(ENV)?;
        let bytes = name.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abs) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abs)
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&name)),
        };
        match addr.and_then(|addr| {
            Ok(Notifier {
                sock: UnixDatagram::unbound()?,
                addr,
            })
        }) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(
                    "{ENV}={name:?} cannot be used ({e}): systemd will not hear READY=1"
                );
                None
            }
        }
    }

    /// Sends `state` (newline-separated `KEY=value` lines). A failure is
    /// logged and otherwise ignored: systemd then times the start out.
    pub(crate) fn send(&self, state: &str) {
        if let Err(e) = self.sock.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::warn!("cannot notify systemd ({ENV}): {e}");
        }
    }
}
