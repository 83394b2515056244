/// The rolling database checksum (DESIGN §4): XOR over all pages of `pageHash(number, image)`.
///
/// XOR lets a record update the checksum from its own pages alone: out goes the old page's
/// hash, in goes the new one. Two nodes with equal checksums at the same (epoch, lsn) hold
/// identical databases (invariant 6) with overwhelming probability. Images are hashed as
/// plaintext so that re-encryption with fresh nonces does not change the checksum.
public struct PageHashes: Sendable, Equatable {
    public private(set) var checksum: UInt64 = 0
    private var hashes: [UInt64] = [] // index = page number - 1; 0 = no page yet

    public init() {}

    public var pageCount: Int { hashes.count }

    /// Sets one page's image.
    public mutating func set(page number: UInt32, image: UnsafeRawBufferPointer) {
        let index = Int(number) - 1
        precondition(index >= 0, "page number 0")
        if index >= hashes.count { hashes.append(contentsOf: repeatElement(0, count: index + 1 - hashes.count)) }
        let new = Self.pageHash(number: number, image: image)
        checksum ^= hashes[index] ^ new
        hashes[index] = new
    }

    public mutating func set(page number: UInt32, image: [UInt8]) {
        image.withUnsafeBytes { set(page: number, image: $0) }
    }

    /// Drops every page past `pages` (a commit that shrank the database).
    public mutating func truncate(toPages pages: Int) {
        guard pages < hashes.count else { return }
        for h in hashes[pages...] { checksum ^= h }
        hashes.removeSubrange(pages...)
    }

    /// Applies a record's pages and size: the checksum afterwards is the database's after it.
    public mutating func apply(pages: [Page], dbSizePages: UInt32) {
        for page in pages where page.number <= dbSizePages { set(page: page.number, image: page.bytes) }
        truncate(toPages: Int(dbSizePages))
    }

    /// A 64-bit non-cryptographic hash of a page and its number (so a page moved to another
    /// number hashes differently). Hand-written: the allowed packages offer only cryptographic
    /// hashes, needlessly slow for hashing every page of every commit. Not for adversarial input.
    public static func pageHash(number: UInt32, image: UnsafeRawBufferPointer) -> UInt64 {
        let m: UInt64 = 0x9E37_79B9_7F4A_7C15
        var h: UInt64 = 0x243F_6A88_85A3_08D3 ^ (UInt64(number) &* m)
        let words = image.count / 8
        for i in 0..<words {
            let w = image.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)
            h = (h ^ mix(w &+ UInt64(i))) &* m
            h = (h << 29) | (h >> 35)
        }
        for i in (words * 8)..<image.count { h = (h ^ UInt64(image[i])) &* m }
        h ^= UInt64(image.count)
        // An all-zero hash would make a page indistinguishable from "absent"; avoid it.
        let final = mix(h)
        return final == 0 ? 1 : final
    }

    @inline(__always)
    private static func mix(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension PageHashes {
    /// The checksum the database would have after a commit of `pages` leaving `dbSizePages`,
    /// without changing anything: a commit that fails must leave the hashes as they were.
    public func checksum(afterApplying pages: [Page], dbSizePages: UInt32) -> UInt64 {
        var result = checksum
        for page in pages where page.number <= dbSizePages {
            let index = Int(page.number) - 1
            let old = index < hashes.count ? hashes[index] : 0
            let new = page.bytes.withUnsafeBytes { Self.pageHash(number: page.number, image: $0) }
            result ^= old ^ new
        }
        let size = Int(dbSizePages)
        if size < hashes.count {
            for index in size..<hashes.count { result ^= hashes[index] }
        }
        return result
    }
}
