//! SMBIOS 3.0 tables: the machine identity a guest reads with `dmidecode` or in
//! `/sys/class/dmi/id` (manufacturer, product, serial, UUID, chassis, OEM strings).
//!
//! The tables are built here as bytes; where they go is the platform's business (x86 direct
//! boot: the F-segment, where Linux scans for the `_SM3_` anchor). Structures written: type 0
//! (BIOS), 1 (system), 2 (baseboard), 3 (chassis), 11 (OEM strings, when there are any) and 127
//! (end of table). docs/smbios.md lists the fields.

use serde::{Deserialize, Serialize};

/// Size of the SMBIOS 3.0 (64-bit) entry point.
const ENTRY_POINT_LEN: usize = 0x18;
/// Where the structure table starts, relative to the entry point.
pub const TABLE_OFFSET: u64 = 0x20;
/// Most strings one structure may reference (a string number is one byte).
const MAX_STRINGS: usize = 255;
/// SMBIOS version the tables follow.
const VERSION: (u8, u8) = (3, 0);
/// Manufacturer and product when the configuration names none.
pub const DEFAULT_MANUFACTURER: &str = "tern";
/// Product when the configuration names none.
pub const DEFAULT_PRODUCT: &str = "tern VM";

/// A VM's SMBIOS identity (`PUT /tern/v1/smbios`, or `smbios` in the config file). Every field
/// is optional; strings may not hold NUL or other control characters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmbiosConfig {
    /// System (type 1) and baseboard (type 2) manufacturer; "tern" when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    /// System and baseboard product name; "tern VM" when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// System and baseboard version; tern's version when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// System and baseboard serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// System UUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`; a random one per VM when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// System SKU number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// System family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Chassis (type 3) serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chassis_serial: Option<String>,
    /// Chassis asset tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chassis_asset_tag: Option<String>,
    /// OEM strings (type 11), at most 255.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oem_strings: Vec<String>,
}

/// Why an SMBIOS configuration cannot be written. [`SmbiosError::field`] names the
/// configuration field; the message says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmbiosError {
    /// A string holds a byte SMBIOS strings cannot carry.
    #[error(
        "character {index} is {ch:?}, a control character; SMBIOS strings hold printable text \
         only"
    )]
    BadChar {
        /// The configuration field.
        field: String,
        /// Its position (in characters).
        index: usize,
        /// The character.
        ch: char,
    },
    /// The UUID is not 32 hex digits in the 8-4-4-4-12 form.
    #[error("{0:?} is not a UUID; give it as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")]
    BadUuid(String),
    /// More OEM strings than one structure can number.
    #[error("{0} strings; at most {MAX_STRINGS} fit one SMBIOS structure")]
    TooManyOemStrings(usize),
    /// The tables outgrow the space the platform has for them.
    #[error(
        "the SMBIOS tables would take {len} bytes and at most {room} fit the platform's SMBIOS \
         area; shorten the strings"
    )]
    TooLarge {
        /// Bytes needed.
        len: usize,
        /// Bytes available.
        room: usize,
    },
}

impl SmbiosError {
    /// The configuration field the error is about (`smbios.serial`, `smbios.oem_strings[2]`).
    pub fn field(&self) -> String {
        match self {
            SmbiosError::BadChar { field, .. } => format!("smbios.{field}"),
            SmbiosError::BadUuid(_) => "smbios.uuid".into(),
            SmbiosError::TooManyOemStrings(_) => "smbios.oem_strings".into(),
            SmbiosError::TooLarge { .. } => "smbios".into(),
        }
    }
}

impl SmbiosConfig {
    /// Checks every string and the UUID, without building anything.
    pub fn check(&self) -> Result<(), SmbiosError> {
        let fields = [
            ("manufacturer", &self.manufacturer),
            ("product", &self.product),
            ("version", &self.version),
            ("serial", &self.serial),
            ("sku", &self.sku),
            ("family", &self.family),
            ("chassis_serial", &self.chassis_serial),
            ("chassis_asset_tag", &self.chassis_asset_tag),
        ];
        for (field, s) in fields {
            if let Some(s) = s {
                check_text(field, s)?;
            }
        }
        if self.oem_strings.len() > MAX_STRINGS {
            return Err(SmbiosError::TooManyOemStrings(self.oem_strings.len()));
        }
        for (i, s) in self.oem_strings.iter().enumerate() {
            check_text(&format!("oem_strings[{i}]"), s)?;
        }
        if let Some(u) = &self.uuid {
            parse_uuid(u)?;
        }
        Ok(())
    }
}

fn check_text(field: &str, s: &str) -> Result<(), SmbiosError> {
    match s.chars().enumerate().find(|(_, c)| c.is_control()) {
        Some((index, ch)) => Err(SmbiosError::BadChar {
            field: field.to_string(),
            index,
            ch,
        }),
        None => Ok(()),
    }
}

/// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` into its 16 bytes, in the order written.
pub fn parse_uuid(s: &str) -> Result<[u8; 16], SmbiosError> {
    let bad = || SmbiosError::BadUuid(s.to_string());
    let groups: Vec<&str> = s.split('-').collect();
    if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return Err(bad());
    }
    let hex: String = groups.concat();
    // from_str_radix alone would take a sign ("+f").
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Formats 16 bytes as a UUID string (lower case), in the order given.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// One SMBIOS structure: its formatted area and its strings.
struct Structure {
    bytes: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    fn new(kind: u8, len: u8, handle: u16) -> Self {
        let mut bytes = vec![0u8; usize::from(len)];
        bytes[0] = kind;
        bytes[1] = len;
        bytes[2..4].copy_from_slice(&handle.to_le_bytes());
        Structure {
            bytes,
            strings: Vec::new(),
        }
    }

    /// Sets the string field at `offset` to `s` (string number 0, "none", when empty).
    fn string(&mut self, offset: usize, s: &str) {
        if s.is_empty() {
            return;
        }
        self.strings.push(s.to_string());
        // At most 255 strings per structure: checked for type 11, the others have a few.
        self.bytes[offset] = self.strings.len() as u8;
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    fn append_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bytes);
        if self.strings.is_empty() {
            out.extend_from_slice(&[0, 0]);
            return;
        }
        for s in &self.strings {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        out.push(0);
    }
}

/// The structure table for `cfg`, with `uuid` as the system UUID (the configured one, parsed,
/// or one the caller made up) in SMBIOS's byte order.
fn table(cfg: &SmbiosConfig, uuid: [u8; 16]) -> Vec<u8> {
    let text = |s: &Option<String>, default: &str| s.clone().unwrap_or_else(|| default.to_string());
    let manufacturer = text(&cfg.manufacturer, DEFAULT_MANUFACTURER);
    let product = text(&cfg.product, DEFAULT_PRODUCT);
    let version = text(&cfg.version, env!("CARGO_PKG_VERSION"));
    let serial = text(&cfg.serial, "");
    let mut out = Vec::new();

    // Type 0, BIOS information (SMBIOS 2.4+ layout, 0x18 bytes).
    let mut bios = Structure::new(0, 0x18, 0);
    bios.string(0x04, DEFAULT_MANUFACTURER);
    bios.string(0x05, env!("CARGO_PKG_VERSION"));
    bios.put(0x06, &0xe800u16.to_le_bytes()); // starting segment, as other VMMs give
    bios.string(0x08, "01/01/2026");
    // Characteristics: bit 3, "not supported"; extension byte 2, bit 4: a virtual machine.
    bios.put(0x0a, &(1u64 << 3).to_le_bytes());
    bios.put(0x13, &[1 << 4]);
    bios.put(0x14, &[0, 0, 0xff, 0xff]); // BIOS 0.0, no embedded controller
    bios.append_to(&mut out);

    // Type 1, system information (0x1b bytes).
    let mut sys = Structure::new(1, 0x1b, 0x100);
    sys.string(0x04, &manufacturer);
    sys.string(0x05, &product);
    sys.string(0x06, &version);
    sys.string(0x07, &serial);
    // SMBIOS 2.6+: the first three UUID fields are little-endian.
    let mut u = uuid;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    sys.put(0x08, &u);
    sys.put(0x18, &[0x06]); // wake-up type: power switch
    sys.string(0x19, &text(&cfg.sku, ""));
    sys.string(0x1a, &text(&cfg.family, ""));
    sys.append_to(&mut out);

    // Type 2, baseboard (0x0f bytes), in chassis 0x300.
    let mut board = Structure::new(2, 0x0f, 0x200);
    board.string(0x04, &manufacturer);
    board.string(0x05, &product);
    board.string(0x06, &version);
    board.string(0x07, &serial);
    board.put(0x09, &[0x01]); // feature flags: a hosting board
    board.put(0x0b, &0x300u16.to_le_bytes());
    board.put(0x0d, &[0x0a]); // board type: motherboard
    board.append_to(&mut out);

    // Type 3, chassis (2.7+ layout with the SKU string, 0x16 bytes; no contained elements).
    let mut chassis = Structure::new(3, 0x16, 0x300);
    chassis.string(0x04, &manufacturer);
    chassis.put(0x05, &[0x01]); // type: other
    chassis.string(0x06, &version);
    chassis.string(0x07, &text(&cfg.chassis_serial, ""));
    chassis.string(0x08, &text(&cfg.chassis_asset_tag, ""));
    chassis.put(0x09, &[0x03, 0x03, 0x03, 0x02]); // boot-up, power, thermal: safe; security: unknown
    chassis.append_to(&mut out);

    // Type 11, OEM strings (0x05 bytes), only when there are any. An empty OEM string still
    // counts, so it is written as a single space.
    if !cfg.oem_strings.is_empty() {
        let mut oem = Structure::new(11, 0x05, 0xb00);
        oem.put(0x04, &[cfg.oem_strings.len() as u8]);
        for s in &cfg.oem_strings {
            oem.strings
                .push(if s.is_empty() { " ".into() } else { s.clone() });
        }
        oem.append_to(&mut out);
    }

    // Type 127, end of table.
    Structure::new(127, 4, 0x7f00).append_to(&mut out);
    out
}

/// The SMBIOS area for `cfg`: the 3.0 entry point at offset 0, then the structure table at
/// [`TABLE_OFFSET`], to be placed at guest-physical `addr` (the entry point names the table by
/// its address). `uuid` is used when the configuration has none. At most `room` bytes.
pub fn build(
    cfg: &SmbiosConfig,
    uuid: [u8; 16],
    addr: u64,
    room: usize,
) -> Result<Vec<u8>, SmbiosError> {
    cfg.check()?;
    let uuid = match &cfg.uuid {
        Some(u) => parse_uuid(u)?,
        None => uuid,
    };
    let table = table(cfg, uuid);
    let len = TABLE_OFFSET as usize + table.len();
    if len > room {
        return Err(SmbiosError::TooLarge { len, room });
    }
    let mut ep = [0u8; ENTRY_POINT_LEN];
    ep[0..5].copy_from_slice(b"_SM3_");
    ep[6] = ENTRY_POINT_LEN as u8;
    ep[7] = VERSION.0;
    ep[8] = VERSION.1;
    ep[9] = 0; // docrev
    ep[10] = 1; // entry point revision: 3.0
    ep[12..16].copy_from_slice(&(table.len() as u32).to_le_bytes());
    ep[16..24].copy_from_slice(&(addr + TABLE_OFFSET).to_le_bytes());
    ep[5] = checksum(&ep);
    let mut out = vec![0u8; TABLE_OFFSET as usize];
    out[..ENTRY_POINT_LEN].copy_from_slice(&ep);
    out.extend_from_slice(&table);
    Ok(out)
}

/// The byte that makes `bytes` sum to zero (its own place holding zero).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a structure table the way a guest does: (type, formatted bytes, strings).
    fn walk(table: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let kind = table[at];
            let len = usize::from(table[at + 1]);
            let formatted = table[at..at + len].to_vec();
            let mut p = at + len;
            let mut strings = Vec::new();
            if table[p] == 0 {
                p += 2;
            } else {
                while table[p] != 0 {
                    let end = p + table[p..].iter().position(|b| *b == 0).unwrap();
                    strings.push(String::from_utf8(table[p..end].to_vec()).unwrap());
                    p = end + 1;
                }
                p += 1;
            }
            out.push((kind, formatted, strings));
            at = p;
            if kind == 127 {
                assert_eq!(at, table.len(), "type 127 ends the table");
                return out;
            }
        }
    }

    fn str_at(s: &(u8, Vec<u8>, Vec<String>), offset: usize) -> &str {
        match s.1[offset] {
            0 => "",
            n => &s.2[usize::from(n) - 1],
        }
    }

    fn full() -> SmbiosConfig {
        SmbiosConfig {
            manufacturer: Some("Acme".into()),
            product: Some("Widget".into()),
            version: Some("2.0".into()),
            serial: Some("SN-1234".into()),
            uuid: Some("12345678-9abc-def0-1122-334455667788".into()),
            sku: Some("sku-9".into()),
            family: Some("fam".into()),
            chassis_serial: Some("CH-77".into()),
            chassis_asset_tag: Some("asset-5".into()),
            oem_strings: vec!["io.tern.one=1".into(), "".into(), "ünïcode".into()],
        }
    }

    #[test]
    fn entry_point_names_the_table_and_sums_to_zero() {
        let blob = build(&full(), [0; 16], 0xf0000, 0x10000).unwrap();
        assert_eq!(&blob[0..5], b"_SM3_");
        assert_eq!(checksum(&blob[..ENTRY_POINT_LEN]), 0);
        assert_eq!(blob[6], 0x18);
        assert_eq!((blob[7], blob[8]), (3, 0));
        let len = u32::from_le_bytes(blob[12..16].try_into().unwrap()) as usize;
        let addr = u64::from_le_bytes(blob[16..24].try_into().unwrap());
        assert_eq!(addr, 0xf0020);
        assert_eq!(len, blob.len() - TABLE_OFFSET as usize);
    }

    #[test]
    fn structures_carry_the_configured_identity() {
        let blob = build(&full(), [0; 16], 0xf0000, 0x10000).unwrap();
        let s = walk(&blob[TABLE_OFFSET as usize..]);
        let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
        assert_eq!(kinds, vec![0, 1, 2, 3, 11, 127]);
        let sys = &s[1];
        assert_eq!(str_at(sys, 0x04), "Acme");
        assert_eq!(str_at(sys, 0x05), "Widget");
        assert_eq!(str_at(sys, 0x06), "2.0");
        assert_eq!(str_at(sys, 0x07), "SN-1234");
        assert_eq!(str_at(sys, 0x19), "sku-9");
        assert_eq!(str_at(sys, 0x1a), "fam");
        // Little-endian first three fields, as Linux prints them back with %pUl.
        assert_eq!(
            &sys.1[0x08..0x18],
            &[
                0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
                0x77, 0x88
            ]
        );
        let chassis = &s[3];
        assert_eq!(str_at(chassis, 0x07), "CH-77");
        assert_eq!(str_at(chassis, 0x08), "asset-5");
        let oem = &s[4];
        assert_eq!(oem.1[4], 3);
        assert_eq!(oem.2, vec!["io.tern.one=1", " ", "ünïcode"]);
    }

    #[test]
    fn defaults_fill_what_is_not_configured() {
        let uuid = [7u8; 16];
        let blob = build(&SmbiosConfig::default(), uuid, 0xf0000, 0x10000).unwrap();
        let s = walk(&blob[TABLE_OFFSET as usize..]);
        let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
        assert_eq!(kinds, vec![0, 1, 2, 3, 127], "no OEM strings, no type 11");
        assert_eq!(str_at(&s[1], 0x04), DEFAULT_MANUFACTURER);
        assert_eq!(str_at(&s[1], 0x05), DEFAULT_PRODUCT);
        assert_eq!(str_at(&s[1], 0x07), "", "no serial: string number 0");
        assert_eq!(&s[1].1[0x08..0x18], &uuid);
    }

    #[test]
    fn bad_strings_uuids_and_sizes_are_refused() {
        let c = SmbiosConfig {
            serial: Some("a\0b".into()),
            ..Default::default()
        };
        assert_eq!(
            c.check(),
            Err(SmbiosError::BadChar {
                field: "serial".into(),
                index: 1,
                ch: '\0'
            })
        );
        let c = SmbiosConfig {
            oem_strings: vec!["ok".into(), "new\nline".into()],
            ..Default::default()
        };
        let e = c.check().unwrap_err();
        assert_eq!(e.field(), "smbios.oem_strings[1]");
        assert!(e.to_string().contains("'\\n', a control character"), "{e}");
        for bad in [
            "",
            "12345678-9abc-def0-1122-33445566778",
            "12345678-9abc-def0-1122-33445566778g",
            "123456789abcdef01122334455667788",
            "1234567-89abc-def0-1122-334455667788",
            "+2345678-9abc-def0-1122-334455667788",
            "é234567-9abc-def0-1122-334455667788",
        ] {
            let c = SmbiosConfig {
                uuid: Some(bad.into()),
                ..Default::default()
            };
            assert_eq!(c.check(), Err(SmbiosError::BadUuid(bad.into())), "{bad}");
        }
        let c = SmbiosConfig {
            oem_strings: vec!["x".into(); 256],
            ..Default::default()
        };
        assert_eq!(c.check(), Err(SmbiosError::TooManyOemStrings(256)));
        let c = SmbiosConfig {
            serial: Some("s".repeat(70_000)),
            ..Default::default()
        };
        match build(&c, [0; 16], 0xf0000, 0x10000) {
            Err(SmbiosError::TooLarge { len, room }) => {
                assert!(len > 70_000);
                assert_eq!(room, 0x10000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn uuids_round_trip() {
        let s = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
        assert_eq!(format_uuid(&parse_uuid(s).unwrap()), s);
        assert_eq!(
            parse_uuid("0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9").unwrap(),
            parse_uuid(s).unwrap()
        );
    }

    /// Debian's dmidecode decodes the tables as a guest's would (`--from-dump`: the entry
    /// point at offset 0, the table at 0x20).
    #[test]
    fn dmidecode_reads_the_tables() {
        let Ok(out) = std::process::Command::new("dmidecode")
            .arg("--version")
            .output()
        else {
            eprintln!(
                "SKIPPED dmidecode_reads_the_tables: no dmidecode on this host (apt-get install dmidecode)"
            );
            return;
        };
        assert!(out.status.success());
        let blob = build(&full(), [0; 16], 0, 0x10000).unwrap();
        let dir = std::env::temp_dir().join(format!("tern-smbios-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dump = dir.join("dump.bin");
        std::fs::write(&dump, &blob).unwrap();
        let out = std::process::Command::new("dmidecode")
            .arg("--from-dump")
            .arg(&dump)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        for want in [
            "SMBIOS 3.0.0 present.",
            "Manufacturer: Acme",
            "Product Name: Widget",
            "Serial Number: SN-1234",
            "UUID: 12345678-9abc-def0-1122-334455667788",
            "SKU Number: sku-9",
            "Family: fam",
            "Serial Number: CH-77",
            "Asset Tag: asset-5",
            "String 1: io.tern.one=1",
            "System is a virtual machine",
        ] {
            assert!(text.contains(want), "dmidecode lacks {want:?}:\n{text}");
        }
        for bad in ["Invalid", "OUT OF SPEC", "Wrong DMI structures"] {
            assert!(!text.contains(bad), "dmidecode says {bad:?}:\n{text}");
        }
    }
}
