//! The process's open-file limit and how many client connections it leaves
//! room for.
//!
//! Every accepted connection is a file descriptor, and so is every RocksDB
//! file, binlog segment, snapshot file and outgoing connection. A node that
//! lets clients take every descriptor cannot roll its next binlog segment or
//! open an SST: the write path dies. So the binaries raise the soft
//! `RLIMIT_NOFILE` to the hard limit at start, and the server accepts at most
//! [`connection_budget`] connections, keeping a reserve for everything else.

/// Descriptors kept for RocksDB, binlog segments, snapshots and outgoing
/// connections at least, whatever the limit.
pub const MIN_RESERVED_FDS: u64 = 64;
/// Most descriptors kept in reserve: past this, a larger limit goes to clients.
pub const MAX_RESERVED_FDS: u64 = 1024;

/// The soft open-file limit before and after [`raise_fd_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// Largest limit asked for when the hard limit is "unlimited" (the kernel
/// refuses more than its own `nr_open` anyway).
const UNLIMITED_CAP: u64 = 1 << 20;

fn getrlimit() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

/// The current soft open-file limit.
pub fn fd_limit() -> std::io::Result<u64> {
    Ok(getrlimit()?.rlim_cur as u64)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (a process may always do
/// that) and returns both values.
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let lim = getrlimit()?;
    let before = lim.rlim_cur as u64;
    let hard = lim.rlim_max as u64;
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        UNLIMITED_CAP.max(before)
    } else {
        hard
    };
    if target <= before {
        return Ok(FdLimit {
            before,
            after: before,
            hard,
        });
    }
    let raised = libc::rlimit {
        rlim_cur: target as libc::rlim_t,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit(2) reads the struct we pass; it only changes this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(FdLimit {
        before,
        after: fd_limit()?,
        hard,
    })
}

/// [`raise_fd_limit`], logged (a failure is a warning: the node runs on with
/// the limit it has, and serves fewer connections).
pub fn raise_fd_limit_logged() {
    match raise_fd_limit() {
        Ok(l) if l.after > l.before => tracing::info!(
            before = l.before,
            soft = l.after,
            hard = l.hard,
            "raised the open-file limit (RLIMIT_NOFILE)"
        ),
        Ok(l) => tracing::info!(
            soft = l.after,
            hard = l.hard,
            "open-file limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
    }
}

/// How many connections a node serves at once, and the descriptors it keeps
/// for itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// The soft open-file limit this was computed from.
    pub fd_limit: u64,
    /// Descriptors left to RocksDB, binlog segments, snapshots, outgoing links.
    pub reserved: u64,
    /// `server.max_connections`, lowered to what the limit leaves room for.
    pub max_connections: usize,
}

/// The connection limit under an open-file limit of `fd_limit`: half the
/// limit (at least [`MIN_RESERVED_FDS`], at most [`MAX_RESERVED_FDS`]) stays
/// in reserve, the rest may be connections, never more than `configured` and
/// never fewer than one.
pub fn connection_budget(fd_limit: u64, configured: usize) -> ConnectionBudget {
    let reserved = (fd_limit / 2).clamp(MIN_RESERVED_FDS, MAX_RESERVED_FDS);
    let room = usize::try_from(fd_limit.saturating_sub(reserved)).unwrap_or(usize::MAX);
    ConnectionBudget {
        fd_limit,
        reserved,
        max_connections: configured.min(room).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_a_reserve() {
        // The integration test's limit.
        let b = connection_budget(256, 4096);
        assert_eq!((b.reserved, b.max_connections), (128, 128));
        // A common default soft limit.
        let b = connection_budget(1024, 4096);
        assert_eq!((b.reserved, b.max_connections), (512, 512));
        // Large limits: the reserve is capped and the configured value wins.
        let b = connection_budget(1 << 20, 4096);
        assert_eq!((b.reserved, b.max_connections), (1024, 4096));
        let b = connection_budget(3000, 4096);
        assert_eq!((b.reserved, b.max_connections), (1024, 1976));
        // Tiny limits still leave the minimum reserve and one connection.
        let b = connection_budget(100, 4096);
        assert_eq!((b.reserved, b.max_connections), (64, 36));
        let b = connection_budget(10, 4096);
        assert_eq!((b.reserved, b.max_connections), (64, 1));
        let b = connection_budget(1 << 20, 10);
        assert_eq!(b.max_connections, 10);
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let r = raise_fd_limit().unwrap();
        assert!(r.after >= r.before);
        assert_eq!(fd_limit().unwrap(), r.after);
        if getrlimit().unwrap().rlim_max != libc::RLIM_INFINITY {
            assert_eq!(r.after, r.hard);
        }
    }
}
