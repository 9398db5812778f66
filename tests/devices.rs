//! The virtio devices inside a booted guest (directly or nested; see tests/common): block
//! (root filesystem, durability across SIGKILL, read-only, two request queues, rate limiter), network (two TAPs in
//! a private network namespace, ping and 100 MiB each way), balloon (inflate, deflate,
//! statistics). virtio-rng is in tests/boot.rs. `pci_all_devices` puts every device on PCI
//! under Debian's stock cloud kernel.

mod common;

use common::{Outcome, Scenario};

const RATE_KIB_S: u64 = 4096;

const SCENARIOS: &[Scenario] = &[
    // The ext4 root filesystem of the guest kit, booted as /dev/vda without an initramfs.
    Scenario {
        initrd: false,
        guest_cmd: "shell",
        files: &["rootfs.ext4"],
        pre: "cp rootfs.ext4 blk_rootfs.ext4",
        drives: &[
            r#"{"drive_id": "rootfs", "path_on_host": "blk_rootfs.ext4", "is_root_device": true, "is_read_only": false}"#,
        ],
        script: Some(
            "while read -r dev mp fs _; do [ \"$mp\" = / ] && echo \"GUEST ROOT $dev $fs\"; done < /proc/mounts\n\
             echo \"GUEST ROOTDEV $(cat /sys/block/vda/dev)\"\n\
             echo \"GUEST SERIAL $(cat /sys/block/vda/serial)\"\n\
             echo kept > /root/written-by-guest && sync && echo 'GUEST ROOT WRITABLE'\n",
        ),
        ..Scenario::new("blk_rootfs")
    },
    // O_DIRECT writes and fsync, then SIGKILL: the host file must hold the data.
    Scenario {
        guest_cmd: "shell",
        pre: "dd if=/dev/zero of=blk_sigkill.img bs=1M count=8 2>/dev/null",
        drives: &[
            r#"{"drive_id": "data", "path_on_host": "blk_sigkill.img", "is_root_device": false}"#,
        ],
        script: Some(
            "dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null\n\
             echo \"GUEST PATTERN_MD5 $(md5sum < /tmp/p)\"\n\
             dd if=/tmp/p of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null\n\
             echo \"GUEST WRITE_RC $?\"\n\
             echo 'GUEST WROTE'\n\
             sleep 600\n",
        ),
        kill_after: Some("GUEST WROTE"),
        post: "echo \"HOST FILE_MD5 $(head -c 4194304 blk_sigkill.img | md5sum)\"",
        ..Scenario::new("blk_sigkill")
    },
    // A read-only drive: writes fail in the guest and the file is unchanged.
    Scenario {
        guest_cmd: "shell",
        pre: "dd if=/dev/urandom of=blk_ro.img bs=1M count=1 2>/dev/null; md5sum < blk_ro.img > blk_ro.md5",
        drives: &[
            r#"{"drive_id": "ro", "path_on_host": "blk_ro.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        script: Some(
            "echo \"GUEST RO_FLAG $(cat /sys/block/vda/ro)\"\n\
             dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null\n\
             echo \"GUEST RO_WRITE_RC $?\"\n\
             echo \"GUEST RO_READ_MD5 $(md5sum < /dev/vda)\"\n",
        ),
        post: "echo \"HOST RO_BEFORE $(cat blk_ro.md5)\"; echo \"HOST RO_AFTER $(md5sum < blk_ro.img)\"",
        ..Scenario::new("blk_readonly")
    },
    // Two request queues on two vCPUs: the guest's blk-mq gets two hardware queues, and two
    // writers at once (each 4 MiB, O_DIRECT) land intact.
    Scenario {
        guest_cmd: "shell",
        vcpus: 2,
        pre: "truncate -s 16M blk_mq.img",
        drives: &[
            r#"{"drive_id": "mq", "path_on_host": "blk_mq.img", "is_root_device": false, "num_queues": 2}"#,
        ],
        script: Some(
            "echo \"GUEST MQ $(ls /sys/block/vda/mq | wc -l)\"\n\
             dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null\n\
             dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null\n\
             dd if=/tmp/a of=/dev/vda bs=64k oflag=direct 2>/dev/null &\n\
             dd if=/tmp/b of=/dev/vda bs=64k seek=64 oflag=direct 2>/dev/null &\n\
             wait\n\
             sync\n\
             echo \"GUEST MQ_MD5 $(cat /tmp/a /tmp/b | md5sum)\"\n",
        ),
        post: "echo \"HOST MQ_MD5 $(head -c 8388608 blk_mq.img | md5sum)\"",
        ..Scenario::new("blk_multiqueue")
    },
    // Bandwidth bucket of 1 MiB refilled every 250 ms: 4 MiB/s.
    Scenario {
        guest_cmd: "shell",
        pre: "truncate -s 64M blk_rl.img",
        drives: &[
            r#"{"drive_id": "limited", "path_on_host": "blk_rl.img", "is_root_device": false,
                "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 250}}}"#,
        ],
        script: Some(
            "read -r a _ < /proc/uptime\n\
             dd if=/dev/vda of=/dev/null bs=64k count=512 iflag=direct 2>/dev/null\n\
             read -r b _ < /proc/uptime\n\
             echo \"GUEST DD_KIB 32768\"\n\
             echo \"GUEST DD_UPTIMES $a $b\"\n",
        ),
        ..Scenario::new("blk_ratelimit")
    },
    // Two queue pairs on a multi-queue TAP, two vCPUs: the guest's driver takes both into use,
    // and two flows each way at once, one sender on each vCPU (virtio-net's XPS maps vCPU i
    // to transmit queue i), arrive intact.
    Scenario {
        guest_cmd: "shell",
        vcpus: 2,
        mem_mib: 512,
        netns: true,
        timeout_s: 300,
        config_extra: r#""network-interfaces": [
            {"iface_id": "eth0", "host_dev_name": "mq0", "guest_mac": "06:00:ac:10:02:02", "num_queue_pairs": 2}]"#,
        pre: "./tern-bench mktap --multi-queue mq0\n\
              ip link set lo up\n\
              ip addr add 172.16.2.1/24 dev mq0 && ip link set mq0 up\n\
              dd if=/dev/urandom of=mq_c.bin bs=1M count=16 2>/dev/null\n\
              dd if=/dev/urandom of=mq_d.bin bs=1M count=16 2>/dev/null\n\
              nc -l -p 5011 -e sh -c 'cat > mq_a.bin' &\n\
              nc -l -p 5012 -e sh -c 'cat > mq_b.bin' &\n\
              nc -l -p 5013 -e sh -c 'cat mq_c.bin' &\n\
              nc -l -p 5014 -e sh -c 'cat mq_d.bin' &\n",
        script: Some(
            "ip addr add 172.16.2.2/24 dev eth0 && ip link set eth0 up\n\
             echo \"GUEST QUEUES $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"\n\
             dd if=/dev/urandom of=/tmp/a.bin bs=1M count=16 2>/dev/null\n\
             dd if=/dev/urandom of=/tmp/b.bin bs=1M count=16 2>/dev/null\n\
             echo \"GUEST A_MD5 $(md5sum < /tmp/a.bin)\"\n\
             echo \"GUEST B_MD5 $(md5sum < /tmp/b.bin)\"\n\
             taskset 1 nc 172.16.2.1 5011 -e sh -c 'cat /tmp/a.bin' &\n\
             taskset 2 nc 172.16.2.1 5012 -e sh -c 'cat /tmp/b.bin' &\n\
             wait\n\
             rm /tmp/a.bin /tmp/b.bin\n\
             taskset 1 nc 172.16.2.1 5013 -e sh -c 'cat > /tmp/c.bin' &\n\
             taskset 2 nc 172.16.2.1 5014 -e sh -c 'cat > /tmp/d.bin' &\n\
             wait\n\
             echo \"GUEST C_MD5 $(md5sum < /tmp/c.bin)\"\n\
             echo \"GUEST D_MD5 $(md5sum < /tmp/d.bin)\"\n",
        ),
        post: "sleep 1; for f in a b c d; do echo \"HOST MQ_$f $(md5sum < mq_$f.bin)\"; done\n\
               rm -f mq_a.bin mq_b.bin mq_c.bin mq_d.bin",
        ..Scenario::new("net_multiqueue")
    },
    // Two TAPs in a private network namespace; ping both, 100 MiB each way on the first.
    Scenario {
        guest_cmd: "shell",
        mem_mib: 512,
        netns: true,
        timeout_s: 300,
        config_extra: r#""network-interfaces": [
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"},
            {"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:01:02"}]"#,
        pre: "./tern-bench mktap tap0 tap1\n\
              ip link set lo up\n\
              ip addr add 172.16.0.1/24 dev tap0 && ip link set tap0 up\n\
              ip addr add 172.16.1.1/24 dev tap1 && ip link set tap1 up\n\
              dd if=/dev/urandom of=net_down.bin bs=1M count=100 2>/dev/null\n\
              nc -l -p 5001 -e sh -c 'cat > net_up.bin' &\n\
              nc -l -p 5002 -e sh -c 'cat net_down.bin' &\n",
        script: Some(
            "ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up\n\
             ip addr add 172.16.1.2/24 dev eth1 && ip link set eth1 up\n\
             echo \"GUEST MAC0 $(cat /sys/class/net/eth0/address)\"\n\
             echo \"GUEST MAC1 $(cat /sys/class/net/eth1/address)\"\n\
             ping -c 3 -W 5 172.16.0.1 >/dev/null && echo 'GUEST PING0 ok'\n\
             ping -c 3 -W 5 172.16.1.1 >/dev/null && echo 'GUEST PING1 ok'\n\
             dd if=/dev/urandom of=/tmp/tx.bin bs=1M count=100 2>/dev/null\n\
             echo \"GUEST TX_MD5 $(md5sum < /tmp/tx.bin)\"\n\
             read -r a _ < /proc/uptime\n\
             nc 172.16.0.1 5001 -e sh -c 'cat /tmp/tx.bin'\n\
             read -r b _ < /proc/uptime\n\
             echo \"GUEST UPLOAD_S $a $b\"\n\
             rm /tmp/tx.bin\n\
             nc 172.16.0.1 5002 -e sh -c 'cat > /tmp/rx.bin'\n\
             read -r c _ < /proc/uptime\n\
             echo \"GUEST DOWNLOAD_S $b $c\"\n\
             echo \"GUEST RX_MD5 $(md5sum < /tmp/rx.bin)\"\n\
             echo \"GUEST RX_BYTES $(wc -c < /tmp/rx.bin)\"\n",
        ),
        post: "sleep 1; echo \"HOST UP_MD5 $(md5sum < net_up.bin)\"\n\
               echo \"HOST DOWN_MD5 $(md5sum < net_down.bin)\"\n\
               rm -f net_up.bin net_down.bin",
        ..Scenario::new("net_two_taps")
    },
    // Balloon: the guest touches 380 MiB and frees it; the steps inflate by half the guest's
    // memory (256 MiB), then deflate, sampling tern's RSS and the statistics.
    Scenario {
        guest_cmd: "shell",
        mem_mib: 512,
        timeout_s: 180,
        config_extra: r#""balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
        script: Some(
            "avail() { while read -r k v _; do [ \"$k\" = MemAvailable: ] && echo $v; done < /proc/meminfo; }\n\
             mount -o remount,size=90% /tmp\n\
             dd if=/dev/zero of=/tmp/fill bs=1M count=380 2>/dev/null; rm /tmp/fill\n\
             echo \"GUEST FILLED $(avail)\"\n\
             echo \"GUEST VDA_SECTORS_BEFORE $(cat /sys/block/vda/size)\"\n\
             i=0; while [ $i -lt 80 ]; do echo \"GUEST AVAIL $(avail)\"; sleep 0.5; i=$((i + 1)); done\n\
             echo \"GUEST VDA_SECTORS_AFTER $(cat /sys/block/vda/size)\"\n",
        ),
        pre: "dd if=/dev/zero of=balloon.other.img bs=1k count=8 2>/dev/null",
        api_with_config: true,
        api_steps: Some(
            r#"[
            {"wait": "GUEST FILLED", "sleep_ms": 1500, "rss": "filled"},
            {"req": "PATCH /drives/script", "body": {"drive_id": "script", "path_on_host": "balloon.other.img",
              "rate_limiter": {"ops": {"size": 1000, "refill_time": 100}}}},
            {"req": "PATCH /drives/script", "body": {"drive_id": "script", "path_on_host": "/nonexistent.img"}},
            {"req": "PATCH /drives/nosuch", "body": {"drive_id": "nosuch", "path_on_host": "balloon.other.img"}},
            {"req": "GET /balloon/statistics"},
            {"req": "PATCH /balloon", "body": {"amount_mib": 256}},
            {"req": "GET /balloon/statistics", "until": "\"actual_pages\":65536,"},
            {"rss": "inflated"},
            {"req": "GET /balloon/statistics", "until_changed": true},
            {"wait_next": "GUEST AVAIL"},
            {"wait_next": "GUEST AVAIL"},
            {"req": "GET /balloon"},
            {"req": "PATCH /balloon", "body": {"amount_mib": 0}},
            {"req": "GET /balloon/statistics", "until": "\"actual_pages\":0,"},
            {"req": "GET /balloon/statistics", "until_changed": true}
        ]"#,
        ),
        ..Scenario::new("balloon")
    },
    // vsock, both directions at once: the guest echoes 10 000 messages the host sends through
    // `CONNECT 5000`, and sends 10 000 to the host's `vsock.sock_5001`, checking each echo.
    // Every 5 s the guest prints its timer and virtio interrupt counts (`GUEST TICK`): when
    // the traffic stops (run 12), they tell a frozen guest from one whose device interrupt no
    // longer arrives.
    Scenario {
        guest_cmd: "shell",
        timeout_s: 300,
        host_build: Some(
            "$CC -static -O2 -o vsock-echo.img \"$TERN_WORKSPACE/tests/guest/vsock-echo.c\" && truncate -s %4096 vsock-echo.img",
        ),
        drives: &[
            r#"{"drive_id": "tools", "path_on_host": "vsock-echo.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        config_extra: r#""vsock": {"guest_cid": 3, "uds_path": "vsock.sock"}"#,
        pre: "./tern-bench vsock-serve vsock.sock_5001 10000 > vsock_srv.out 2>&1 &\n\
              ./tern-bench vsock-connect vsock.sock 5000 10000 > vsock_cli.out 2>&1 &\n",
        script: Some(
            "cat /dev/vda > /tmp/ve && chmod +x /tmp/ve\n\
             /tmp/ve server 5000 10000 > /tmp/srv.log 2>&1 &\n\
             srv=$!\n\
             (while sleep 5; do echo \"GUEST TICK $(cut -d' ' -f1 /proc/uptime) $(grep -E 'LOC|virtio' /proc/interrupts | tr -s ' ' | tr '\\n' ';')\"; done) &\n\
             tick=$!\n\
             /tmp/ve client 2 5001 10000 | sed 's/^/GUEST /'\n\
             wait $srv\n\
             kill $tick\n\
             sed 's/^/GUEST /' /tmp/srv.log\n",
        ),
        post: "for i in 1 2 3 4 5 6 7 8 9 10; do grep -q 'CLIENT' vsock_cli.out && break; sleep 1; done\n\
               cat vsock_srv.out vsock_cli.out",
        ..Scenario::new("vsock_echo")
    },
    // Every device on PCI (machine-config.pci), under Debian's stock cloud kernel with its
    // own modules: the functions the guest enumerates, their MSI-X vectors, a two-queue
    // drive's md5 round trip with both queues' vectors taking interrupts, a ping, the rng,
    // the balloon inflated through the API, vsock both ways; then the guest moves the drive's
    // BAR (unbind, rewrite BAR 0 through sysfs, remove, rescan) and reads it back there.
    Scenario {
        kernel: common::Kernel::OwnBzImage,
        guest_cmd: "shell",
        vcpus: 2,
        mem_mib: 512,
        pci: true,
        netns: true,
        timeout_s: 300,
        extra_args: "guest.hwrng=1",
        entropy: true,
        // The tools drive: the vsock echo program and Debian's lspci.
        host_build: Some(
            "$CC -static -O2 -o ve \"$TERN_WORKSPACE/tests/guest/vsock-echo.c\" && sh \"$TERN_WORKSPACE/tests/guest/debian-tools.sh\" pci_tools.img ve",
        ),
        pre: "truncate -s 16M pci_data.img\n\
              ./tern-bench mktap ptap0\n\
              ip link set lo up\n\
              ip addr add 172.16.5.1/24 dev ptap0 && ip link set ptap0 up\n\
              ./tern-bench vsock-serve pci_vsock.sock_5001 200 > pci_vsock_srv.out 2>&1 &\n\
              ./tern-bench vsock-connect pci_vsock.sock 5000 200 > pci_vsock_cli.out 2>&1 &\n",
        drives: &[
            r#"{"drive_id": "data", "path_on_host": "pci_data.img", "is_root_device": false, "num_queues": 2}"#,
            r#"{"drive_id": "tools", "path_on_host": "pci_tools.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        config_extra: r#""network-interfaces": [
            {"iface_id": "eth0", "host_dev_name": "ptap0", "guest_mac": "06:00:ac:10:05:02"}],
            "vsock": {"guest_cid": 3, "uds_path": "pci_vsock.sock"},
            "balloon": {"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
        api_with_config: true,
        api_steps: Some(
            r#"[
            {"wait": "GUEST BALLOON READY"},
            {"req": "PATCH /balloon", "body": {"amount_mib": 64}},
            {"req": "GET /balloon/statistics", "until": "\"actual_mib\":64,"}
        ]"#,
        ),
        script: Some(
            "for d in /sys/bus/pci/devices/*; do echo \"GUEST PCI ${d##*/} $(cat $d/vendor) $(cat $d/device) $(basename \"$(readlink $d/driver)\")\"; done\n\
             mkdir /t && tar -xf /dev/vdb -C /t\n\
             /t/run lspci -n | sed 's/^/GUEST LSPCI /'\n\
             irqs() { grep virtio /proc/interrupts | tr -s ' ' | sed \"s/^/GUEST IRQ$1 /\"; }\n\
             irqs 0\n\
             dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null\n\
             dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null\n\
             taskset 1 dd if=/tmp/a of=/dev/vda bs=64k oflag=direct 2>/dev/null &\n\
             taskset 2 dd if=/tmp/b of=/dev/vda bs=64k seek=64 oflag=direct 2>/dev/null &\n\
             wait\n\
             sync\n\
             echo \"GUEST MQ $(ls /sys/block/vda/mq | wc -l)\"\n\
             echo \"GUEST WRITTEN_MD5 $(cat /tmp/a /tmp/b | md5sum)\"\n\
             echo \"GUEST READ_MD5 $(head -c 8388608 /dev/vda | md5sum)\"\n\
             irqs 1\n\
             ip addr add 172.16.5.2/24 dev eth0 && ip link set eth0 up\n\
             ping -c 3 -W 5 172.16.5.1 >/dev/null && echo 'GUEST PING ok'\n\
             echo 'GUEST BALLOON READY'\n\
             /t/ve server 5000 200 > /tmp/srv.log 2>&1 &\n\
             srv=$!\n\
             /t/ve client 2 5001 200 | sed 's/^/GUEST /'\n\
             wait $srv\n\
             sed 's/^/GUEST /' /tmp/srv.log\n\
             dev=$(readlink -f /sys/block/vda/device); dev=${dev%/*}; bdf=${dev##*/}\n\
             echo \"GUEST BAR_BEFORE $(head -1 $dev/resource)\"\n\
             echo $bdf > /sys/bus/pci/drivers/virtio-pci/unbind\n\
             printf '\\000\\000\\000\\360' | dd of=$dev/config bs=4 seek=4 conv=notrunc 2>/dev/null\n\
             echo 1 > $dev/remove\n\
             echo 1 > /sys/bus/pci/rescan\n\
             dev=/sys/bus/pci/devices/$bdf\n\
             echo \"GUEST BAR_AFTER $(head -1 $dev/resource)\"\n\
             b=$(ls $dev/virtio*/block)\n\
             echo \"GUEST MOVED_MD5 $(head -c 8388608 /dev/$b | md5sum)\"\n",
        ),
        post: "for i in 1 2 3 4 5 6 7 8 9 10; do grep -q 'CLIENT' pci_vsock_cli.out && break; sleep 1; done\n\
               cat pci_vsock_srv.out pci_vsock_cli.out\n\
               echo \"HOST DATA_MD5 $(head -c 8388608 pci_data.img | md5sum)\"",
        ..Scenario::new("pci_all_devices")
    },
    // INTx: a guest without MSI (`pci=nomsi`) gets each function's interrupt through its
    // slot's INTA# line (x86: an IOAPIC pin, by the DSDT's _PRT and link devices; ARM64: a
    // GIC SPI, by the device tree's interrupt-map): a drive's md5 round trip and the rng.
    Scenario {
        guest_cmd: "shell",
        pci: true,
        entropy: true,
        extra_args: "pci=nomsi guest.hwrng=1",
        drives: &[
            r#"{"drive_id": "data", "path_on_host": "intx_data.img", "is_root_device": false}"#,
        ],
        pre: "truncate -s 4M intx_data.img\n",
        script: Some(INTX_SCRIPT),
        post: "echo \"HOST DATA_MD5 $(head -c 2097152 intx_data.img | md5sum)\"",
        ..Scenario::new("pci_intx")
    },
    // The same on an ARM64 host whose KVM has only a GICv2: no ITS, so no MSI-X at all; tern
    // says so and the functions use INTx.
    Scenario {
        guest_cmd: "shell",
        pci: true,
        gicv2: true,
        vcpus: 2,
        entropy: true,
        extra_args: "guest.hwrng=1",
        drives: &[
            r#"{"drive_id": "data", "path_on_host": "intx2_data.img", "is_root_device": false}"#,
        ],
        pre: "truncate -s 4M intx2_data.img\n",
        script: Some(INTX_SCRIPT),
        post: "echo \"HOST DATA_MD5 $(head -c 2097152 intx2_data.img | md5sum)\"",
        ..Scenario::new("gicv2_pci_intx")
    },
];

/// What the INTx scenarios' guest does: its virtio interrupt lines before and after writing
/// and reading back 2 MiB on the drive.
const INTX_SCRIPT: &str = "irqs() { grep virtio /proc/interrupts | tr -s ' ' | sed \"s/^/GUEST IRQ$1 /\"; }\n\
     irqs 0\n\
     dd if=/dev/urandom of=/tmp/a bs=1M count=2 2>/dev/null\n\
     dd if=/tmp/a of=/dev/vda bs=64k oflag=direct 2>/dev/null\n\
     sync\n\
     echo \"GUEST WRITTEN_MD5 $(cat /tmp/a | md5sum)\"\n\
     echo \"GUEST READ_MD5 $(head -c 2097152 /dev/vda | md5sum)\"\n\
     irqs 1\n";

static BATCHES: common::Batches = common::Batches::new();

/// The scenario's outcome on each architecture that ran it.
fn runs(name: &str) -> Vec<&'static Outcome> {
    common::outcomes(&BATCHES, "devices", SCENARIOS, name)
}

/// The value of `KEY <value>` printed by the host's post commands.
fn host_value(o: &Outcome, key: &str) -> Option<String> {
    let prefix = format!("HOST {key} ");
    o.post
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_string()))
}

fn assert_clean_exit(o: &Outcome) {
    assert_eq!(o.exit_code, Some(0), "{}", o.console());
    assert!(!o.timed_out, "{}", o.console());
    assert!(o.has_line("GUEST SCRIPT END rc=0"), "{}", o.console());
}

#[test]
fn blk_ext4_rootfs_boots_as_root_on_vda() {
    for o in runs("blk_rootfs") {
        blk_ext4_rootfs_boots_as_root_on_vda_on(o);
    }
}

fn blk_ext4_rootfs_boots_as_root_on_vda_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = o.console();
    // Mounted by the kernel (the kit's kernel: /dev/root) or by tern's initramfs (Debian's
    // kernel, virtio-blk as a module: /dev/vda).
    let root = o.guest_value("ROOT");
    assert!(
        matches!(root.as_deref(), Some("/dev/root ext4" | "/dev/vda ext4")),
        "{root:?}\n{ctx}"
    );
    // /dev/vda is block major 254 minor 0 for virtio-blk.
    assert!(
        o.guest_value("ROOTDEV").is_some_and(|d| d.ends_with(":0")),
        "{ctx}"
    );
    // GET_ID answers the drive id.
    assert_eq!(o.guest_value("SERIAL").as_deref(), Some("rootfs"), "{ctx}");
    assert!(o.has_line("GUEST ROOT WRITABLE"), "{ctx}");
}

#[test]
fn blk_direct_fsync_writes_survive_sigkill() {
    for o in runs("blk_sigkill") {
        blk_direct_fsync_writes_survive_sigkill_on(o);
    }
}

fn blk_direct_fsync_writes_survive_sigkill_on(o: &'static Outcome) {
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    assert_eq!(o.signal, Some(9), "tern was killed: {ctx}");
    assert_eq!(o.guest_value("WRITE_RC").as_deref(), Some("0"), "{ctx}");
    let want = o.guest_value("PATTERN_MD5").expect("guest md5");
    assert_eq!(host_value(o, "FILE_MD5"), Some(want), "{ctx}");
}

#[test]
fn blk_read_only_drive_refuses_writes_and_stays_identical() {
    for o in runs("blk_readonly") {
        blk_read_only_drive_refuses_writes_and_stays_identical_on(o);
    }
}

fn blk_read_only_drive_refuses_writes_and_stays_identical_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    assert_eq!(o.guest_value("RO_FLAG").as_deref(), Some("1"), "{ctx}");
    assert_ne!(o.guest_value("RO_WRITE_RC").as_deref(), Some("0"), "{ctx}");
    let before = host_value(o, "RO_BEFORE").expect("md5 before");
    assert_eq!(host_value(o, "RO_AFTER"), Some(before.clone()), "{ctx}");
    assert_eq!(o.guest_value("RO_READ_MD5"), Some(before), "{ctx}");
}

#[test]
fn blk_two_queues_serve_two_writers() {
    for o in runs("blk_multiqueue") {
        blk_two_queues_serve_two_writers_on(o);
    }
}

fn blk_two_queues_serve_two_writers_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    assert_eq!(
        o.guest_value("MQ").as_deref(),
        Some("2"),
        "two hardware queues\n{ctx}"
    );
    let guest = o.guest_value("MQ_MD5").expect("the guest's md5");
    assert_eq!(host_value(o, "MQ_MD5"), Some(guest), "{ctx}");
}

#[test]
fn net_two_queue_pairs_carry_two_flows_each_way() {
    for o in runs("net_multiqueue") {
        net_two_queue_pairs_carry_two_flows_each_way_on(o);
    }
}

fn net_two_queue_pairs_carry_two_flows_each_way_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    assert_eq!(
        o.guest_value("QUEUES").as_deref(),
        Some("rx-0 rx-1 tx-0 tx-1"),
        "the guest's driver has two queue pairs\n{ctx}"
    );
    assert!(
        o.has_line("net eth0: the driver uses 2 of its 2 queue pairs"),
        "the driver took both pairs into use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)\n{ctx}"
    );
    assert!(
        !o.has_line("net eth0: TAP queue"),
        "attaching and detaching TAP queues went without an error\n{ctx}"
    );
    for (guest, host) in [("A_MD5", "MQ_a"), ("B_MD5", "MQ_b")] {
        let sent = o.guest_value(guest).expect("the guest's md5");
        assert_eq!(
            host_value(o, host),
            Some(sent),
            "guest -> host {host}: {ctx}"
        );
    }
    for (guest, host) in [("C_MD5", "MQ_c"), ("D_MD5", "MQ_d")] {
        let sent = host_value(o, host).expect("the host's md5");
        assert_eq!(
            o.guest_value(guest),
            Some(sent),
            "host -> guest {host}: {ctx}"
        );
    }
}

#[test]
fn blk_rate_limiter_holds_dd_within_20_percent() {
    for o in runs("blk_ratelimit") {
        blk_rate_limiter_holds_dd_within_20_percent_on(o);
    }
}

fn blk_rate_limiter_holds_dd_within_20_percent_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let kib: u64 = o.guest_value("DD_KIB").unwrap().parse().unwrap();
    let times = o.guest_value("DD_UPTIMES").expect("uptimes");
    let t: Vec<f64> = times.split(' ').filter_map(|v| v.parse().ok()).collect();
    assert_eq!(t.len(), 2, "{times}");
    let rate = kib as f64 / (t[1] - t[0]);
    eprintln!(
        "blk_ratelimit: {kib} KiB in {:.2} s = {rate:.0} KiB/s (limit {RATE_KIB_S})",
        t[1] - t[0]
    );
    let limit = RATE_KIB_S as f64;
    assert!(
        rate <= limit * 1.2 && rate >= limit * 0.8,
        "{rate} KiB/s is not within 20% of {RATE_KIB_S} KiB/s\n{}",
        o.console()
    );
}

#[test]
fn net_two_taps_ping_and_100_mib_each_way() {
    for o in runs("net_two_taps") {
        net_two_taps_ping_and_100_mib_each_way_on(o);
    }
}

fn net_two_taps_ping_and_100_mib_each_way_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    assert_eq!(
        o.guest_value("MAC0").as_deref(),
        Some("06:00:ac:10:00:02"),
        "{ctx}"
    );
    assert_eq!(
        o.guest_value("MAC1").as_deref(),
        Some("06:00:ac:10:01:02"),
        "{ctx}"
    );
    assert!(o.has_line("GUEST PING0 ok"), "{ctx}");
    assert!(o.has_line("GUEST PING1 ok"), "{ctx}");
    let tx = o.guest_value("TX_MD5").expect("tx md5");
    assert_eq!(host_value(o, "UP_MD5"), Some(tx), "guest -> host: {ctx}");
    assert_eq!(
        o.guest_value("RX_BYTES").as_deref(),
        Some("104857600"),
        "{ctx}"
    );
    let down = host_value(o, "DOWN_MD5").expect("down md5");
    assert_eq!(o.guest_value("RX_MD5"), Some(down), "host -> guest: {ctx}");
    for key in ["UPLOAD_S", "DOWNLOAD_S"] {
        eprintln!("net_two_taps: {key} {:?}", o.guest_value(key));
    }
}

fn call<'a>(o: &'a Outcome, request: &str, nth: usize) -> &'a common::ApiCall {
    o.api
        .iter()
        .filter(|c| c.request == request)
        .nth(nth)
        .unwrap_or_else(|| panic!("no call #{nth} {request}: {:#?}", o.api))
}

fn json(c: &common::ApiCall) -> serde_json::Value {
    serde_json::from_str(&c.body).unwrap_or_else(|e| panic!("{}: {e}: {}", c.request, c.body))
}

/// The last `GUEST AVAIL` value printed before `t` ms.
fn avail_before(o: &Outcome, t: f64) -> u64 {
    o.line_times("GUEST AVAIL ")
        .iter()
        .rev()
        .find(|(at, _)| *at < t)
        .and_then(|(_, l)| l.rsplit(' ').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no GUEST AVAIL before {t} ms\n{}", o.console()))
}

#[test]
fn balloon_inflates_deflates_and_reports_statistics() {
    for o in runs("balloon") {
        balloon_inflates_deflates_and_reports_statistics_on(o);
    }
}

fn balloon_inflates_deflates_and_reports_statistics_on(o: &'static Outcome) {
    let ctx = format!("{}\napi: {:#?}", o.console(), o.api);
    assert_eq!(o.steps_error, None, "{ctx}");
    assert_clean_exit(o);
    let rss = |label: &str| -> u64 { call(o, &format!("RSS {label}"), 0).body.parse().unwrap() };
    let (filled, inflated) = (rss("filled"), rss("inflated"));
    eprintln!("balloon: tern RSS {filled} KiB filled, {inflated} KiB inflated by 256 MiB");
    // Not every ballooned page was resident; most were (the guest touched 380 of 512 MiB).
    assert!(
        inflated + 128 * 1024 < filled,
        "RSS {filled} -> {inflated} KiB: {ctx}"
    );
    let inflate = call(o, "PATCH /balloon", 0);
    let deflate = call(o, "PATCH /balloon", 1);
    assert_eq!((inflate.status, deflate.status), (204, 204), "{ctx}");
    // The steps waited for two more of the guest's MemAvailable lines once the balloon had
    // reached its size (the second one read at least one 0.5 s period after that), so the last
    // line before the deflate request was read at the full size.
    let before = avail_before(o, inflate.sent_ms);
    let during = avail_before(o, deflate.sent_ms);
    let after = avail_before(o, f64::MAX);
    eprintln!("balloon: guest MemAvailable {before} -> {during} -> {after} KiB");
    assert!(during + 200 * 1024 < before, "{ctx}");
    assert!(after + 50 * 1024 > before, "{ctx}");
    let cfg = json(call(o, "GET /balloon", 0));
    assert_eq!(cfg["amount_mib"], 256, "{ctx}");
    // The steps wait for the balloon to reach each size, then for the guest's next statistics
    // (refreshed every second), so each sample below was taken at that size.
    let s = |n| json(call(o, "GET /balloon/statistics", n));
    let (s0, full, s1, empty, s2) = (s(0), s(1), s(2), s(3), s(4));
    assert_eq!(full["target_pages"], 65536, "{ctx}");
    assert_eq!(full["actual_pages"], 65536, "{ctx}");
    assert_eq!(s1["actual_pages"], 65536, "{ctx}");
    assert_eq!(empty["actual_pages"], 0, "{ctx}");
    let free = |s: &serde_json::Value| s["free_memory"].as_u64().expect("free_memory");
    assert!(free(&s1) + 200 * 1024 * 1024 < free(&s0), "{s0} {s1}");
    assert!(free(&s2) > free(&s1) + 200 * 1024 * 1024, "{s1} {s2}");
    assert!(s0["total_memory"].as_u64().is_some(), "{s0}");
    // PATCH /drives on the running VM: a new backing file (the guest sees the new size) and a
    // limiter; a missing file and an unknown drive are refused.
    assert_eq!(call(o, "PATCH /drives/script", 0).status, 204, "{ctx}");
    let bad = call(o, "PATCH /drives/script", 1);
    assert_eq!(bad.status, 400, "{ctx}");
    assert!(bad.body.contains("nonexistent.img"), "{}", bad.body);
    assert_eq!(call(o, "PATCH /drives/nosuch", 0).status, 400, "{ctx}");
    assert_eq!(
        o.guest_value("VDA_SECTORS_BEFORE").as_deref(),
        Some("8"),
        "{ctx}"
    );
    assert_eq!(
        o.guest_value("VDA_SECTORS_AFTER").as_deref(),
        Some("16"),
        "{ctx}"
    );
}

#[test]
fn vsock_echoes_10000_messages_each_way_in_order() {
    for o in runs("vsock_echo") {
        vsock_echoes_10000_messages_each_way_in_order_on(o);
    }
}

fn vsock_echoes_10000_messages_each_way_in_order_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    // Guest-initiated: the guest's client got every echo back from the host, in order.
    assert!(o.has_line("GUEST VSOCK client OK 10000"), "{ctx}");
    assert!(o.post.contains("HOST VSOCK SERVER OK 10000"), "{ctx}");
    // Host-initiated: the host's client got every echo back from the guest, in order.
    assert!(o.has_line("GUEST VSOCK server OK 10000"), "{ctx}");
    assert!(o.post.contains("HOST VSOCK CLIENT OK 10000"), "{ctx}");
    for l in o.post.lines().filter(|l| l.starts_with("HOST VSOCK")) {
        eprintln!("vsock_echo ({:?}): {l}", o.arch);
    }
    // Recoveries by the virtio worker's idle check are listed for every scenario
    // (common::check_recoveries).
}

#[test]
fn pci_without_msi_interrupts_through_intx() {
    for o in runs("pci_intx") {
        intx_works_on(o);
    }
}

#[test]
fn pci_on_a_gicv2_host_uses_intx_and_says_so() {
    for o in runs("gicv2_pci_intx") {
        // Nested, L1 has a GICv2; on an ARM64 host it is whatever the host has.
        if common::Arch::host() != common::Arch::Aarch64 {
            assert!(
                o.has_line("the PCI functions interrupt through INTx instead"),
                "{}",
                o.console()
            );
            intx_works_on(o);
        }
    }
}

/// Every virtio interrupt the guest has is a line (no MSI), the drive's (virtio0) took
/// interrupts while its data went out and came back, and the rng served the guest.
fn intx_works_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    let lines = |stage: &str| -> Vec<Vec<String>> {
        let prefix = format!("GUEST IRQ{stage} ");
        o.lines
            .iter()
            .filter_map(|(_, _, l)| l.strip_prefix(&prefix))
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    let after = lines("1");
    assert!(!after.is_empty(), "{ctx}");
    for l in &after {
        let text = l.join(" ");
        assert!(!text.contains("MSI"), "{text}\n{ctx}");
        assert!(text.to_lowercase().contains("edge"), "{text}\n{ctx}");
    }
    // Interrupt counts per CPU: the fields after the number, up to the controller's name.
    let count =
        |l: &Vec<String>| -> u64 { l[1..].iter().map_while(|c| c.parse::<u64>().ok()).sum() };
    let blk = |ls: &[Vec<String>]| {
        ls.iter()
            .find(|l| l.iter().any(|f| f == "virtio0"))
            .map(count)
    };
    let (before, after_n) = (blk(&lines("0")).unwrap_or(0), blk(&after));
    assert!(
        after_n.is_some_and(|a| a > before),
        "virtio0: {before} -> {after_n:?}\n{ctx}"
    );
    let written = o.guest_value("WRITTEN_MD5");
    assert!(written.is_some(), "{ctx}");
    assert_eq!(o.guest_value("READ_MD5"), written, "{ctx}");
    assert_eq!(host_value(o, "DATA_MD5"), written, "{ctx}");
    assert_eq!(
        o.guest_value("HWRNG_BYTES").as_deref(),
        Some("1048576"),
        "{ctx}"
    );
}

#[test]
fn pci_all_devices_work_under_a_stock_kernel() {
    for o in runs("pci_all_devices") {
        pci_all_devices_work_under_a_stock_kernel_on(o);
    }
}

fn pci_all_devices_work_under_a_stock_kernel_on(o: &'static Outcome) {
    assert_clean_exit(o);
    let ctx = format!("{}\npost:\n{}", o.console(), o.post);
    // The functions the guest found: the host bridge and one virtio-pci function per
    // device, each bound to virtio-pci.
    let funcs: Vec<Vec<&str>> = o
        .lines
        .iter()
        .filter_map(|(_, _, l)| l.strip_prefix("GUEST PCI "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        funcs
            .iter()
            .any(|f| f.get(1..3) == Some(&["0x1b36", "0x0008"][..])),
        "host bridge\n{ctx}"
    );
    let mut ids: Vec<&str> = funcs
        .iter()
        .filter(|f| f.get(1) == Some(&"0x1af4"))
        .map(|f| {
            assert_eq!(f.get(3), Some(&"virtio-pci"), "{f:?}\n{ctx}");
            f[2]
        })
        .collect();
    ids.sort_unstable();
    // blk ×3 (data, tools, script), net, rng, balloon, vsock.
    assert_eq!(
        ids,
        [
            "0x1041", "0x1042", "0x1042", "0x1042", "0x1044", "0x1045", "0x1053"
        ],
        "{ctx}"
    );
    // Debian's lspci lists the same: `00:01.0 0100: 1af4:1042 (rev 01)`.
    let mut lspci: Vec<String> = o
        .lines
        .iter()
        .filter_map(|(_, _, l)| l.strip_prefix("GUEST LSPCI "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|id| id.strip_prefix("1af4:"))
        .map(|d| format!("0x{d}"))
        .collect();
    lspci.sort_unstable();
    assert_eq!(lspci, ids, "lspci -n\n{ctx}");
    assert!(o.has_line("GUEST LSPCI 00:00.0 0600: 1b36:0008"), "{ctx}");
    // MSI-X: the drive's two request queues have a vector each, and both took interrupts.
    let irq = |stage: &str, name: &str| -> Option<u64> {
        let prefix = format!("GUEST IRQ{stage} ");
        o.lines.iter().find_map(|(_, _, l)| {
            let f: Vec<&str> = l.strip_prefix(&prefix)?.split_whitespace().collect();
            // PCI-MSI (x86), ITS-MSI or ITS-PCI-MSIX-* (ARM64).
            (f.last() == Some(&name) && l.contains("MSI"))
                .then(|| f[1..=2].iter().filter_map(|c| c.parse::<u64>().ok()).sum())
        })
    };
    let blk = o
        .lines
        .iter()
        .filter_map(|(_, _, l)| l.strip_prefix("GUEST IRQ1 "))
        .find_map(|l| {
            l.split_whitespace()
                .last()
                .filter(|n| n.ends_with("-req.1"))
        })
        .map(|n| n.trim_end_matches("-req.1").to_string())
        .unwrap_or_else(|| panic!("no virtio-blk request queue 1 vector\n{ctx}"));
    for q in ["req.0", "req.1"] {
        let name = format!("{blk}-{q}");
        let (before, after) = (irq("0", &name).unwrap_or(0), irq("1", &name));
        assert!(
            after.is_some_and(|a| a > before),
            "{name}: {before} -> {after:?} interrupts\n{ctx}"
        );
    }
    assert_eq!(o.guest_value("MQ").as_deref(), Some("2"), "{ctx}");
    let written = o.guest_value("WRITTEN_MD5");
    assert!(written.is_some(), "{ctx}");
    assert_eq!(o.guest_value("READ_MD5"), written, "{ctx}");
    assert_eq!(host_value(o, "DATA_MD5"), written, "{ctx}");
    assert!(o.has_line("GUEST PING ok"), "{ctx}");
    assert_eq!(
        o.guest_value("HWRNG_BYTES").as_deref(),
        Some("1048576"),
        "{ctx}"
    );
    // The balloon reached 64 MiB through the API.
    assert_eq!(o.steps_error, None, "{ctx}");
    assert!(
        o.api
            .iter()
            .any(|c| c.request.contains("/balloon/statistics")
                && c.body.contains("\"actual_mib\":64,")),
        "{ctx}"
    );
    assert!(o.has_line("GUEST VSOCK client OK 200"), "{ctx}");
    assert!(o.has_line("GUEST VSOCK server OK 200"), "{ctx}");
    assert!(o.post.contains("HOST VSOCK SERVER OK 200"), "{ctx}");
    assert!(o.post.contains("HOST VSOCK CLIENT OK 200"), "{ctx}");
    // The guest moved the drive's BAR: the script's write (0xf0000000 in its low half),
    // then Linux, which assigns a rescanned device's BARs anew. The device works there.
    let (before, after) = (o.guest_value("BAR_BEFORE"), o.guest_value("BAR_AFTER"));
    match o.arch {
        // tern placed it in the 32-bit window (0xe1000000..); Linux moves it into the 64-bit
        // window (64 GiB for this guest).
        common::Arch::X86_64 => {
            assert!(
                before
                    .as_ref()
                    .is_some_and(|b| b.starts_with("0x00000000e1")),
                "{ctx}"
            );
            assert!(
                after
                    .as_ref()
                    .is_some_and(|b| b.starts_with("0x0000001000000000 ")),
                "{ctx}"
            );
        }
        // Behind a device-tree host Linux assigns every BAR itself at boot: it moved this
        // one from where tern placed it (the 32-bit window, 0x10000000..) into the 64-bit
        // window (64 GiB), and every request above went there. After the script's move and
        // the rescan it is in a window again.
        common::Arch::Aarch64 => {
            assert!(
                before
                    .as_ref()
                    .is_some_and(|b| b.starts_with("0x0000001000000000 ")),
                "{ctx}"
            );
            assert!(
                after.as_ref().is_some_and(|b| b.starts_with("0x00000010")
                    || b.starts_with("0x000000001")
                    || b.starts_with("0x000000002")),
                "{ctx}"
            );
        }
    }
    assert_eq!(o.guest_value("MOVED_MD5"), written, "{ctx}");
}
