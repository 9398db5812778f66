//! MSI-X on KVM through its GSI routing and irqfds: every vector of a function gets a GSI
//! and an irqfd at creation; the vector's route (the message) is set in KVM's routing table
//! when the guest has changed the vector's table entry, and a device raises the vector by
//! writing its irqfd, so the interrupt is injected inside KVM.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the router keeps it: the routes KVM
//! made for the interrupt controller's lines (which the irqfds of the serial port, the
//! virtio-mmio devices and INTx use), then one entry per routed MSI vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::interrupt::{MsiController, MsiVectors};
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES, KvmIrqRouting,
    kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// The first GSI for MSI vectors: after the interrupt controller's pins.
#[cfg(target_arch = "x86_64")]
const FIRST_MSI_GSI: u32 = 24;
#[cfg(target_arch = "aarch64")]
const FIRST_MSI_GSI: u32 = arch::aarch64::layout::GIC_NR_IRQS - 32;

/// The routes KVM sets up when it creates the interrupt controller (`kvm_setup_default_irq_routing`):
/// x86 GSIs 0–15 to the PICs and the IOAPIC, 16–23 to the IOAPIC.
#[cfg(target_arch = "x86_64")]
fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
    let mut routes = Vec::new();
    for gsi in 0..24 {
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_route(gsi, chip, gsi % 8));
        }
    }
    routes
}

/// ARM64: GSI `n` is SPI `n` of the GIC.
#[cfg(target_arch = "aarch64")]
fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    (0..FIRST_MSI_GSI)
        .map(|gsi| irqchip_route(gsi, 0, gsi))
        .collect()
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, address: u64, data: u32, devid: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = address as u32;
    e.u.msi.address_hi = (address >> 32) as u32;
    e.u.msi.data = data;
    // Only an ARM64 ITS needs the requester ID; x86 refuses the flag.
    #[cfg(target_arch = "aarch64")]
    {
        e.flags = kvm_bindings::KVM_MSI_VALID_DEVID;
        e.u.msi.__bindgen_anon_1.devid = devid;
    }
    #[cfg(not(target_arch = "aarch64"))]
    let _ = devid;
    e
}

fn errno(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

struct Table {
    /// MSI routes by GSI.
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
    /// GSIs handed out: the next is `next`, or one given back.
    next: u32,
    free: Vec<u32>,
}

/// A VM's GSI routing table.
pub(super) struct GsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

impl GsiRouter {
    pub(super) fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                next: FIRST_MSI_GSI,
                free: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allocate(&self) -> std::io::Result<u32> {
        let mut t = self.lock();
        if let Some(gsi) = t.free.pop() {
            return Ok(gsi);
        }
        if t.next as usize >= KVM_MAX_IRQ_ROUTES {
            return Err(std::io::Error::other(format!(
                "all {KVM_MAX_IRQ_ROUTES} of KVM's interrupt routes are in use: fewer MSI-X vectors (queues) or devices"
            )));
        }
        t.next += 1;
        Ok(t.next - 1)
    }

    /// Routes `gsi` to a message and hands KVM the table.
    fn set(&self, gsi: u32, route: kvm_irq_routing_entry) -> std::io::Result<()> {
        let mut t = self.lock();
        t.msi.insert(gsi, route);
        self.push(&t)
    }

    fn push(&self, t: &Table) -> std::io::Result<()> {
        let mut entries = irqchip_routes();
        entries.extend(t.msi.values().copied());
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&routing).map_err(errno)
    }

    /// Gives `gsis` back, their routes gone.
    fn release(&self, gsis: &[u32]) {
        let mut t = self.lock();
        let mut routed = false;
        for gsi in gsis {
            routed |= t.msi.remove(gsi).is_some();
            t.free.push(*gsi);
        }
        if routed && let Err(e) = self.push(&t) {
            log::warn!("dropping the routes of GSIs {gsis:?}: {e}");
        }
    }
}

/// Hands out a function's vectors.
pub(super) struct KvmMsi(pub(super) Arc<GsiRouter>);

impl MsiController for KvmMsi {
    fn vectors(&self, count: u16, devid: u32) -> std::io::Result<Arc<dyn MsiVectors>> {
        let mut v = KvmVectors {
            router: self.0.clone(),
            devid,
            irqfds: Vec::with_capacity(usize::from(count)),
        };
        for _ in 0..count {
            let gsi = self.0.allocate()?;
            let evt = match EventFd::new(libc::EFD_NONBLOCK) {
                Ok(e) => e,
                Err(e) => {
                    self.0.release(&[gsi]);
                    return Err(e);
                }
            };
            if let Err(e) = self.0.vm.register_irqfd(&evt, gsi) {
                self.0.release(&[gsi]);
                return Err(errno(e));
            }
            // `v`'s drop gives back what is in it if a later vector fails.
            v.irqfds.push((gsi, evt));
        }
        Ok(Arc::new(v))
    }
}

/// One function's vectors: a GSI and an irqfd each.
struct KvmVectors {
    router: Arc<GsiRouter>,
    devid: u32,
    irqfds: Vec<(u32, EventFd)>,
}

impl KvmVectors {
    fn get(&self, vector: u16) -> std::io::Result<&(u32, EventFd)> {
        self.irqfds.get(usize::from(vector)).ok_or_else(|| {
            std::io::Error::other(format!(
                "MSI-X vector {vector} of a function with {}",
                self.irqfds.len()
            ))
        })
    }
}

impl MsiVectors for KvmVectors {
    fn route(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()> {
        let &(gsi, _) = self.get(vector)?;
        self.router
            .set(gsi, msi_route(gsi, address, data, self.devid))
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        self.get(vector)?.1.write(1)
    }
}

impl Drop for KvmVectors {
    fn drop(&mut self) {
        let mut gsis = Vec::with_capacity(self.irqfds.len());
        for (gsi, evt) in self.irqfds.drain(..) {
            if let Err(e) = self.router.vm.unregister_irqfd(&evt, gsi) {
                log::warn!("unregistering the irqfd of GSI {gsi}: {e}");
            }
            gsis.push(gsi);
        }
        self.router.release(&gsis);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table keeps every route KVM made for the interrupt controller, below the MSI GSIs.
    #[test]
    fn the_irqchip_routes_are_kvms_defaults() {
        let routes = irqchip_routes();
        // SAFETY: every entry was built with its `irqchip` member.
        let pins: Vec<(u32, u32, u32)> = routes
            .iter()
            .map(|e| {
                (e.gsi, unsafe { e.u.irqchip.irqchip }, unsafe {
                    e.u.irqchip.pin
                })
            })
            .collect();
        assert!(routes.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        assert!(pins.iter().all(|&(gsi, _, _)| gsi < FIRST_MSI_GSI));
        #[cfg(target_arch = "x86_64")]
        {
            // GSIs 0–15 on a PIC and the IOAPIC, 16–23 on the IOAPIC.
            assert_eq!(routes.len(), 24 + 16);
            assert!(pins.contains(&(4, kvm_bindings::KVM_IRQCHIP_IOAPIC, 4)));
            assert!(pins.contains(&(4, kvm_bindings::KVM_IRQCHIP_PIC_MASTER, 4)));
            assert!(pins.contains(&(10, kvm_bindings::KVM_IRQCHIP_PIC_SLAVE, 2)));
            assert!(pins.contains(&(23, kvm_bindings::KVM_IRQCHIP_IOAPIC, 23)));
        }
        #[cfg(target_arch = "aarch64")]
        assert_eq!(pins.len(), 96);
        let m = msi_route(FIRST_MSI_GSI, 0x1_fee0_1000, 0x41, 0x18);
        assert_eq!(m.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: built with its `msi` member.
        let msi = unsafe { m.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x41)
        );
    }
}
