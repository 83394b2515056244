import CApiaryCRC

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI, ext4 and LevelDB.
///
/// Hand-written: none of the allowed packages exposes CRC32C. The CPU's instruction when it
/// has one (x86-64 SSE4.2, ARMv8 CRC), else slicing-by-8 tables.
public enum CRC32C {
    static let hardware = apiary_crc32c_hardware_available()

    private static let tables: [[UInt32]] = {
        var t = [[UInt32]](repeating: [UInt32](repeating: 0, count: 256), count: 8)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[0][i] = c
        }
        for i in 0..<256 {
            for k in 1..<8 { t[k][i] = (t[k - 1][i] >> 8) ^ t[0][Int(t[k - 1][i] & 0xFF)] }
        }
        return t
    }()

    public static func checksum<C: Collection>(_ bytes: C, seed: UInt32 = 0) -> UInt32 where C.Element == UInt8 {
        if let fast = bytes.withContiguousStorageIfAvailable({ update(seed, $0) }) { return fast }
        return Array(bytes).withUnsafeBufferPointer { update(seed, $0) }
    }

    public static func checksum(_ buffer: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        update(seed, buffer.bindMemory(to: UInt8.self))
    }

    private static func update(_ seed: UInt32, _ p: UnsafeBufferPointer<UInt8>) -> UInt32 {
        guard hardware, let base = p.baseAddress else { return tableUpdate(seed, p) }
        return ~apiary_crc32c_hardware_update(~seed, base, p.count)
    }

    /// The table version, also the reference the instruction is tested against.
    static func tableUpdate(_ seed: UInt32, _ p: UnsafeBufferPointer<UInt8>) -> UInt32 {
        var crc = ~seed
        var i = 0
        let n = p.count
        let t0 = tables[0], t1 = tables[1], t2 = tables[2], t3 = tables[3]
        let t4 = tables[4], t5 = tables[5], t6 = tables[6], t7 = tables[7]
        while n - i >= 8 {
            let lo = crc ^ (UInt32(p[i]) | UInt32(p[i + 1]) << 8 | UInt32(p[i + 2]) << 16 | UInt32(p[i + 3]) << 24)
            crc = t7[Int(lo & 0xFF)] ^ t6[Int((lo >> 8) & 0xFF)] ^ t5[Int((lo >> 16) & 0xFF)] ^ t4[Int(lo >> 24)]
                ^ t3[Int(p[i + 4])] ^ t2[Int(p[i + 5])] ^ t1[Int(p[i + 6])] ^ t0[Int(p[i + 7])]
            i += 8
        }
        while i < n {
            crc = t0[Int((crc ^ UInt32(p[i])) & 0xFF)] ^ (crc >> 8)
            i += 1
        }
        return ~crc
    }
}
