//! CPUID normalisation: what KVM supports, made consistent with the vCPU count and each vCPU's
//! APIC ID (topology leaves), with the hypervisor bit set.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPO_LEVEL_SMT: u32 = 1;
const TOPO_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things (`ceil(log2(n))`).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `vcpu_count`.
///
/// The topology presented is one socket with `vcpu_count` single-threaded cores, APIC IDs equal
/// to vCPU indices.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, vcpu_count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(vcpu_count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ebx = (e.ebx & !0xff00) | (8 << 8); // CLFLUSH line size: 64 bytes
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (((count - 1) & 0x3f) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPO_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = count;
                        e.ecx = (TOPO_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                // ECX[15:12]: APIC ID bits for cores; ECX[7:0]: cores - 1.
                e.ecx = (bits_for(count) << 12) | ((count - 1) & 0xff);
            }
            LEAF_AMD_EXT_APIC => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // compute unit = core, one thread per unit
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let mut e = vec![entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        normalize(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
        assert_eq!(e[3].ebx, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut e = vec![kvm_cpuid_entry2 {
            function: 1,
            edx: EDX_HTT,
            ..Default::default()
        }];
        normalize(&mut e, 0, 1);
        assert_eq!(e[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn bits() {
        assert_eq!(
            [
                bits_for(1),
                bits_for(2),
                bits_for(3),
                bits_for(4),
                bits_for(5)
            ],
            [0, 1, 2, 2, 3]
        );
    }
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidReg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Bits to force in one register: where `mask` is set, the bit becomes the one in `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitModifier<T> {
    /// Which bits are forced.
    pub mask: T,
    /// Their values.
    pub value: T,
}

/// Firecracker's custom-template modifier of one CPUID leaf/subleaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuidModifier {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input).
    pub subleaf: u32,
    /// Register changes.
    pub registers: Vec<(CpuidReg, BitModifier<u32>)>,
}

/// Parses a Firecracker bitmap: `0b` then up to `bits` characters of `0`, `1` or `x` (keep),
/// most significant first; missing high positions are `x`.
pub fn parse_bitmap(s: &str, bits: u32) -> Result<BitModifier<u64>, String> {
    let body = s
        .strip_prefix("0b")
        .ok_or_else(|| format!("{s:?} does not start with 0b"))?;
    if body.is_empty() || body.len() > bits as usize {
        return Err(format!("{s:?} must have 1 to {bits} digits after 0b"));
    }
    let (mut mask, mut value) = (0u64, 0u64);
    for (i, c) in body.chars().rev().enumerate() {
        match c {
            '0' => mask |= 1 << i,
            '1' => {
                mask |= 1 << i;
                value |= 1 << i;
            }
            'x' | 'X' => {}
            other => return Err(format!("{s:?}: {other:?} is not 0, 1 or x")),
        }
    }
    Ok(BitModifier { mask, value })
}

/// Applies `modifiers` to `entries`; a modifier of a leaf/subleaf KVM does not report is an error.
pub fn apply_modifiers(
    entries: &mut [kvm_cpuid_entry2],
    modifiers: &[CpuidModifier],
) -> Result<(), String> {
    for m in modifiers {
        let e = entries
            .iter_mut()
            .find(|e| {
                e.function == m.leaf && (e.index == m.subleaf || e.flags & 1 == 0 && m.subleaf == 0)
            })
            .ok_or_else(|| {
                format!(
                    "CPUID leaf {:#x} subleaf {:#x} does not exist on this host",
                    m.leaf, m.subleaf
                )
            })?;
        for (reg, b) in &m.registers {
            let r = match reg {
                CpuidReg::Eax => &mut e.eax,
                CpuidReg::Ebx => &mut e.ebx,
                CpuidReg::Ecx => &mut e.ecx,
                CpuidReg::Edx => &mut e.edx,
            };
            *r = (*r & !b.mask) | (b.value & b.mask);
        }
    }
    Ok(())
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn bitmaps_parse_msb_first_with_x_as_keep() {
        let b = parse_bitmap("0bx1x0", 32).unwrap();
        assert_eq!((b.mask, b.value), (0b0101, 0b0100));
        assert!(parse_bitmap("1010", 32).is_err());
        assert!(parse_bitmap("0b", 32).is_err());
        assert!(parse_bitmap("0b102", 32).is_err());
        assert!(parse_bitmap(&format!("0b{}", "1".repeat(33)), 32).is_err());
        assert_eq!(
            parse_bitmap(&format!("0b1{}", "0".repeat(63)), 64)
                .unwrap()
                .value,
            1 << 63
        );
    }

    #[test]
    fn modifiers_force_only_masked_bits() {
        let mut e = vec![kvm_cpuid_entry2 {
            function: 1,
            ecx: 0xffff_0000,
            edx: 0x1,
            ..Default::default()
        }];
        let m = CpuidModifier {
            leaf: 1,
            subleaf: 0,
            registers: vec![
                (
                    CpuidReg::Ecx,
                    BitModifier {
                        mask: 0x8001_0000,
                        value: 0x0000_0001,
                    },
                ),
                (
                    CpuidReg::Edx,
                    BitModifier {
                        mask: 0x2,
                        value: 0x2,
                    },
                ),
            ],
        };
        apply_modifiers(&mut e, &[m]).unwrap();
        assert_eq!(e[0].ecx, 0x7ffe_0000);
        assert_eq!(e[0].edx, 0x3);
        let missing = CpuidModifier {
            leaf: 0x4000_00ff,
            subleaf: 0,
            registers: vec![],
        };
        assert!(
            apply_modifiers(&mut e, &[missing])
                .unwrap_err()
                .contains("0x400000ff")
        );
    }
}
