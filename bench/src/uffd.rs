//! `tern-bench uffd-serve SOCKET MEMFILE`: a page-fault handler for tern's (and Firecracker's)
//! `Uffd` snapshot back-end. It listens on SOCKET, takes the one message the VMM sends (a JSON
//! array of region mappings, with the userfaultfd as `SCM_RIGHTS`), and from then on fills each
//! guest page on its first touch from MEMFILE (pages the guest gave back, e.g. to a balloon,
//! get zeros). It ends when the VMM closes the connection (its VM is gone). Prints
//! "UFFD SERVED <pages>".

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

#[derive(serde::Deserialize, Debug)]
struct Mapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: u64,
    #[serde(default)]
    page_size_kib: u64,
}

pub fn serve(args: &[String]) -> Result<String, String> {
    let (Some(sock), Some(memfile)) = (args.first(), args.get(1)) else {
        return Err("usage: tern-bench uffd-serve SOCKET MEMFILE".into());
    };
    let file = std::fs::File::open(memfile).map_err(|e| format!("{memfile}: {e}"))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
    // SAFETY: a fresh read-only shared mapping of the whole file, checked below; it lives
    // until the process exits.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!(
            "mmap {memfile}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| format!("{sock}: {e}"))?;
    let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let (n, fd) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("receiving the userfaultfd: {e}"))?;
    let fd = fd.ok_or("the VMM sent no userfaultfd")?;
    let maps: Vec<Mapping> =
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("mappings: {e}"))?;
    // SAFETY: the descriptor just received is a userfaultfd that nothing else here owns.
    let uffd = unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) };
    let mut removed = std::collections::HashSet::new();
    let mut served = 0u64;
    loop {
        let mut pfds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if pfds[1].revents != 0 {
            // The VMM closed the connection: its VM is gone.
            break;
        }
        if pfds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            break;
        }
        if pfds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let event = match uffd.read_event() {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => return Err(format!("reading the userfaultfd: {e}")),
        };
        match event {
            userfaultfd::Event::Pagefault { addr, .. } => {
                let addr = addr as u64;
                let Some(m) = maps.iter().find(|m| {
                    (m.base_host_virt_addr..m.base_host_virt_addr + m.size).contains(&addr)
                }) else {
                    return Err(format!("fault at {addr:#x} outside every region"));
                };
                let page = if m.page_size != 0 {
                    m.page_size
                } else {
                    m.page_size_kib * 1024
                };
                let page = page.max(4096);
                let start = addr & !(page - 1);
                let dst = start as *mut libc::c_void;
                let res = if removed.contains(&start) {
                    // SAFETY: `dst` is a page of a range registered with this userfaultfd.
                    unsafe { uffd.zeropage(dst, page as usize, true) }
                } else {
                    let off = m.offset + (start - m.base_host_virt_addr);
                    if off + page > len as u64 {
                        return Err(format!("page at file offset {off:#x} is beyond {memfile}"));
                    }
                    // SAFETY: the source is `page` bytes inside the file mapping (checked
                    // above), the destination a page of a registered range.
                    unsafe {
                        uffd.copy(
                            base.cast::<u8>().add(off as usize).cast(),
                            dst,
                            page as usize,
                            true,
                        )
                    }
                };
                match res {
                    Ok(_) => served += 1,
                    // Another thread's fault filled it first.
                    Err(userfaultfd::Error::CopyFailed(e))
                    | Err(userfaultfd::Error::ZeropageFailed(e))
                        if e as i32 == libc::EEXIST => {}
                    Err(e) => return Err(format!("filling {start:#x}: {e}")),
                }
            }
            userfaultfd::Event::Remove { start, end } => {
                let (s, e) = (start as u64, end as u64);
                let mut p = s & !4095;
                while p < e {
                    removed.insert(p);
                    p += 4096;
                }
            }
            _ => {}
        }
    }
    Ok(format!("UFFD SERVED {served}"))
}
