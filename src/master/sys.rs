//! The master's system calls: signals, child processes, prctl. All of the
//! master's `unsafe` is in this file.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

macro_rules! syscall {
    ($fn: ident ( $($arg: expr),* $(,)? ) ) => {{
        // SAFETY: each call site passes arguments that satisfy the libc
        // function's contract (live pointers to correctly sized values).
        let res = unsafe { libc::$fn($($arg, )*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// The signals the master handles through its signalfd.
pub const SIGNALS: [i32; 7] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn sigset(signals: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid value for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    syscall!(sigemptyset(&mut set))?;
    for &s in signals {
        syscall!(sigaddset(&mut set, s))?;
    }
    Ok(set)
}

/// Blocks [`SIGNALS`] and returns a signalfd that reports them. Children
/// get an empty mask again in `spawn` (a mask survives fork and exec).
pub fn signalfd() -> io::Result<OwnedFd> {
    let set = sigset(&SIGNALS)?;
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // A terminal's Ctrl-C, Ctrl-\\ and hangup reach the whole process
    // group; only the master acts on them (ignored dispositions survive
    // exec). Workers still take SIGTERM: finish the request, then exit.
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
        // SAFETY: sets a disposition; SIG_IGN involves no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let fd = syscall!(signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK))?;
    // SAFETY: signalfd returned a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Starts a thread with every signal blocked, whatever the caller's mask
/// (a thread inherits its creator's). The master's helper threads (the
/// plugin probe's output readers) may start before [`signalfd`] blocks
/// [`SIGNALS`], and may outlive that: a signal the kernel handed to one of
/// them would take its default action (SIGTERM or SIGUSR1 killing the
/// whole master) or be lost (SIGCHLD, never seen by the signalfd).
pub fn spawn_signal_free_thread<F>(f: F) -> io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    // SAFETY: an all-zero sigset_t is valid storage for sigfillset and for
    // pthread_sigmask's old-set output.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    syscall!(sigfillset(&mut all))?;
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are initialised storage; this thread's mask only.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let thread = std::thread::Builder::new().spawn(f);
    // SAFETY: `old` is the mask pthread_sigmask just returned.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    thread
}

/// Whether child `pid` has ended, without reaping it: while it is a
/// zombie its pid (and process-group id) cannot be reused, so its group
/// can still be killed safely ([`kill_group`]) before it is reaped.
pub fn has_ended(pid: i32) -> io::Result<bool> {
    // SAFETY: an all-zero siginfo_t is valid storage for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    syscall!(waitid(
        libc::P_PID,
        pid as libc::id_t,
        &mut info,
        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT
    ))?;
    // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed).
    Ok(unsafe { info.si_pid() } == pid)
}

/// Reads one pending signal number from a signalfd, if any.
pub fn read_signal(fd: &OwnedFd) -> io::Result<Option<i32>> {
    // SAFETY: an all-zero signalfd_siginfo is valid plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, a live local.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n == size as isize {
        return Ok(Some(info.ssi_signo as i32));
    }
    let e = io::Error::last_os_error();
    if n < 0 && e.kind() == io::ErrorKind::WouldBlock {
        return Ok(None);
    }
    Err(e)
}

/// A pollfd watching `fd` for input (and output if `write`). A negative
/// fd is ignored by poll.
pub fn pollfd(fd: RawFd, write: bool) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN | if write { libc::POLLOUT } else { 0 },
        revents: 0,
    }
}

/// Waits until one of `fds` is ready or `timeout` passes; sets `revents`.
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    match syscall!(poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            fds.iter_mut().for_each(|p| p.revents = 0);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// User and system CPU seconds of a process (for the ones reaped, their
/// whole life, from `wait4`'s rusage).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl std::ops::AddAssign for CpuTime {
    fn add_assign(&mut self, o: CpuTime) {
        self.user += o.user;
        self.system += o.system;
    }
}

fn cpu_of(r: &libc::rusage) -> CpuTime {
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    CpuTime {
        user: secs(r.ru_utime),
        system: secs(r.ru_stime),
    }
}

/// A reaped child: its pid, how it ended (exit code, or minus the signal
/// that killed it), and the CPU it used.
pub fn reap() -> io::Result<Option<(i32, i32, CpuTime)>> {
    // Which child ended, without reaping it yet: while it is a zombie its
    // pid (and so the id of the process group a worker leads) cannot be
    // anyone else's, so what is left of its group can be killed safely.
    // SAFETY: all-zero is a valid siginfo_t (plain integers and unions).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    match syscall!(waitid(
        libc::P_ALL,
        0,
        &mut info,
        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT
    )) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(None),
        Err(e) => return Err(e),
    }
    // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed).
    let ended = unsafe { info.si_pid() };
    if ended <= 0 {
        return Ok(None);
    }
    kill_group(ended);
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = match syscall!(wait4(ended, &mut status, libc::WNOHANG, &mut usage)) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(None),
        Err(e) => return Err(e),
    };
    if pid == 0 {
        return Ok(None);
    }
    let how = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        -libc::WTERMSIG(status)
    } else {
        0
    };
    Ok(Some((pid, how, cpu_of(&usage))))
}

/// Waits up to `limit` for child `pid` to end (after a SIGKILL) and reaps
/// it; returns the CPU it used (zero if someone else reaped it).
pub fn reap_pid(pid: i32, limit: std::time::Duration) -> io::Result<CpuTime> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        match syscall!(wait4(pid, &mut status, libc::WNOHANG, &mut usage)) {
            Ok(0) => {}
            Ok(_) => return Ok(cpu_of(&usage)),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(CpuTime::default()),
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "still running"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Sends `sig` to `pid`; a process already gone is not an error.
pub fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill has no memory effects; pid is a child we started.
        unsafe { libc::kill(pid, sig) };
    }
}

/// For the plugin probe child: moves its stdout to a private descriptor
/// (returned, close-on-exec) and points fd 1 at its stderr, so that
/// nothing a plugin prints can mix into the lines the probe reports to
/// its parent, while what it prints still reaches the parent (which
/// quotes the probe's stderr).
pub fn private_stdout() -> io::Result<std::fs::File> {
    let fd = syscall!(fcntl(1, libc::F_DUPFD_CLOEXEC, 3))?;
    // SAFETY: fcntl just created `fd`; nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    syscall!(dup2(2, 1))?;
    Ok(file)
}

/// Makes the process `cmd` starts die with this one (see
/// [`die_with_parent`]), for children started without [`spawn`]; it
/// inherits the descriptors in `keep`.
///
/// It also leads a process group of its own, as workers do, so that what
/// a plugin started in it can be killed with it ([`kill_group`]) instead
/// of living on, holding the parent's pipes.
pub fn dies_with_this_process(cmd: &mut Command, keep: Vec<RawFd>) {
    cmd.process_group(0);
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (fcntl, sigprocmask, prctl, getppid);
    // it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                halfsync_shm::sys::clear_cloexec(fd)?;
            }
            die_with_parent(parent)
        });
    }
}

/// The signals a child starts with blocked, until it has its handlers for
/// them ([`unblock_user_signals`]): SIGUSR1 (the master forwards it to
/// reopen log files) and a stray SIGUSR2 would otherwise kill a child in
/// its first milliseconds, by their default disposition.
const USER_SIGNALS: [i32; 2] = [libc::SIGUSR1, libc::SIGUSR2];

/// Between fork and exec: unblock every signal but [`USER_SIGNALS`] (the
/// master blocks the ones it reads from its signalfd, and a child would
/// inherit that mask), make the child die with the master, and bail out if
/// the master is already gone. Async-signal-safe.
pub fn die_with_parent(master_pid: i32) -> io::Result<()> {
    // SAFETY: an all-zero sigset_t is a valid value for sigemptyset.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    syscall!(sigemptyset(&mut mask))?;
    for sig in USER_SIGNALS {
        syscall!(sigaddset(&mut mask, sig))?;
    }
    // SAFETY: `mask` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    syscall!(prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0
    ))?;
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != master_pid {
        // (A preallocated error: this runs between fork and exec.)
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// In a child, once it catches SIGUSR1 and SIGUSR2: lets them through
/// (one that came meanwhile is delivered now). Before it loads any plugin,
/// so that processes a plugin starts get an ordinary mask.
pub fn unblock_user_signals() {
    let Ok(set) = sigset(&USER_SIGNALS) else {
        return;
    };
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// Sets TCP_DEFER_ACCEPT (seconds) on a listening socket.
pub fn set_defer_accept(s: &impl AsRawFd, seconds: i32) -> io::Result<()> {
    syscall!(setsockopt(
        s.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        (&seconds as *const i32).cast(),
        std::mem::size_of::<i32>() as libc::socklen_t
    ))
    .map(|_| ())
}

/// Whether this process may create files in `dir` (access(2), W_OK and
/// X_OK, as this user).
pub fn check_writable_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a NUL-terminated path for the call's duration.
    syscall!(access(c.as_ptr(), libc::W_OK | libc::X_OK)).map(|_| ())
}

/// The user id of the process at the other end of a Unix socket.
pub fn peer_uid(s: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: an all-zero ucred is valid plain data for getsockopt to fill.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    syscall!(getsockopt(
        s.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_PEERCRED,
        (&mut cred as *mut libc::ucred).cast(),
        &mut len
    ))?;
    Ok(cred.uid)
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Sets the process umask; returns the previous one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// Sets the calling thread's name (the `comm` field shown by `ps -o comm`
/// and `top`), cut to 15 bytes.
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Starts `exe` in a role with the given fds inherited (everything else the
/// master holds is close-on-exec) and returns its pid.
/// With `output`, the child's stdout and stderr are that instead of the
/// master's.
pub fn spawn(
    exe: &Path,
    title: &str,
    role: &str,
    env: &[(&str, String)],
    keep: &[RawFd],
    output: Option<OwnedFd>,
    own_group: bool,
) -> std::io::Result<i32> {
    let master_pid = std::process::id() as i32;
    let mut cmd = Command::new(exe);
    // `own_group` (workers): the child leads a process group of its own,
    // which the processes its plugin starts join; when it is reaped, the
    // master kills what is left of the group (`reap`), so a plugin's
    // forgotten children do not outlive its worker. Out of the terminal's
    // foreground group, it ignores SIGTTOU, so that its log lines to a
    // terminal with `stty tostop` are written rather than stopping it.
    if own_group {
        cmd.process_group(0);
    }
    cmd.arg0(title)
        .env(super::ROLE_ENV, role)
        .env_remove(super::notify::ENV)
        .stdin(Stdio::null());
    if let Some(fd) = output {
        cmd.stdout(Stdio::from(fd.try_clone()?));
        cmd.stderr(Stdio::from(fd));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let keep = keep.to_vec();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (fcntl, signal, prctl, getppid); it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                halfsync_shm::sys::clear_cloexec(fd)?;
            }
            if own_group {
                libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            }
            die_with_parent(master_pid)
        });
    }
    let child = cmd.spawn()?;
    // The master reaps children itself with waitpid(-1); std's Child is
    // dropped without waiting, which neither kills nor reaps.
    Ok(child.id() as i32)
}

/// A pipe (both ends close-on-exec): (read end, non-blocking; write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK))?;
    // SAFETY: pipe2 just created both descriptors; nothing else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The write end blocks: a child writing to its stderr waits for the
    // master rather than losing lines (std's own writes expect that).
    let flags = syscall!(fcntl(w.as_raw_fd(), libc::F_GETFL))?;
    syscall!(fcntl(
        w.as_raw_fd(),
        libc::F_SETFL,
        flags & !libc::O_NONBLOCK
    ))?;
    Ok((r, w))
}

/// Reads what is there now from a non-blocking `fd` into `buf` (at most
/// `max` bytes); `Ok(0)` at end of file, `Err(WouldBlock)` when empty.
pub fn read_some(fd: &OwnedFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + max, 0);
    // SAFETY: `buf[start..]` is `max` writable bytes owned by `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf[start..].as_mut_ptr().cast(), max) };
    let n = if n < 0 {
        buf.truncate(start);
        return Err(io::Error::last_os_error());
    } else {
        n as usize
    };
    buf.truncate(start + n);
    Ok(n)
}

/// An inherited descriptor named by the environment (`HALFSYNC_LOG_FD`),
/// if it is open.
pub fn inherited_fd(fd: RawFd) -> Option<std::fs::File> {
    // (Close-on-exec from now on: not for processes a plugin starts.)
    if fd < 3 || halfsync_shm::sys::set_cloexec(fd).is_err() {
        return None;
    }
    // SAFETY: the parent passed this open descriptor to this process for
    // this one use; nothing else here owns it.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Sets close-on-exec on every descriptor above stderr this process
/// inherited open (from a shell, a supervisor, a test harness): the master
/// passes its children what they need by name, and nothing it did not
/// open itself should reach a worker, or the processes a plugin starts.
pub fn cloexec_inherited() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // (The directory's own descriptor, closed by now, fails: fine.)
        let _ = halfsync_shm::sys::set_cloexec(fd);
    }
}

/// Raises the soft open-file limit to at least `want` (within the hard
/// one); returns (old, new) if it changed it.
pub fn raise_nofile_to(want: u64) -> io::Result<Option<(u64, u64)>> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
    let old = lim.rlim_cur;
    let new = want.min(lim.rlim_max);
    if new <= old {
        return Ok(None);
    }
    lim.rlim_cur = new;
    syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    Ok(Some((old, new)))
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` times (100
/// where it cannot be read, the value on every common Linux).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as u64 } else { 100 }
}

/// Kills the process group child `pid` leads (see [`spawn`]): itself, if
/// it still runs, and the processes its plugin started and left behind.
/// Only while `pid` is not reaped (alive or a zombie) is it sure that no
/// one else has that id; for a child that leads no group, nothing.
pub fn kill_group(pid: i32) {
    if pid > 1 {
        // SAFETY: kill(2) takes no pointers; ESRCH (no one left) is fine.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}
