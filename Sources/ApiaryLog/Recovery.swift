#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import ApiaryCore

// MARK: - Opening an existing log

extension ReplicationLog {
    struct Recovered {
        var segments: [Segment]
        var activeFD: Int32
        var tornTailBytes: Int
    }

    /// Brings the directory to a consistent state and indexes it; see ``init(directory:options:)``.
    static func recover(directory: String, directoryFD: Int32, options: Options) throws -> Recovered {
        var logs: [(firstLSN: LSN, path: String)] = []
        var resets: [String] = []
        for name in try POSIX.listDirectory(directory) {
            switch SegmentName.parse(name) {
            case .log(let lsn): logs.append((lsn, join(directory, name)))
            case .reset: resets.append(join(directory, name))
            case .temporary:
                // Never renamed into place, so never part of the log.
                try POSIX.unlink(join(directory, name))
            case nil: continue
            }
        }
        // Also covers renames and removals a crashed process made but never synced: what this
        // open builds on must not vanish with a later power loss.
        try POSIX.fsync(directoryFD, path: directory)

        if !resets.isEmpty {
            logs = try finishReset(resets, logs: logs, directory: directory, directoryFD: directoryFD)
        }
        if logs.isEmpty {
            let path = join(directory, SegmentName.log(firstLSN: 1))
            let fd = try createSegmentFile(at: path, base: .zero, directoryFD: directoryFD, directory: directory)
            return Recovered(segments: [Segment(path: path, base: .zero)], activeFD: fd, tornTailBytes: 0)
        }
        logs.sort { $0.firstLSN < $1.firstLSN }

        var segments: [Segment] = []
        var tornTailBytes = 0
        for (i, entry) in logs.enumerated() {
            let isLast = i == logs.count - 1
            let fd = try POSIX.open(entry.path, flags: isLast ? O_RDWR : O_RDONLY)
            do {
                let scanned = try scanSegment(fd: fd, path: entry.path, namedFirstLSN: entry.firstLSN,
                                              previous: segments.last?.last, isLast: isLast, options: options)
                segments.append(scanned.segment)
                tornTailBytes = scanned.tornTailBytes
                if isLast {
                    // What was read may still sit only in the page cache (a crash of this
                    // process, not of the machine): make it durable before building on it.
                    try POSIX.fsync(fd, path: entry.path)
                    return Recovered(segments: segments, activeFD: fd, tornTailBytes: tornTailBytes)
                }
                POSIX.close(fd)
            } catch {
                POSIX.close(fd)
                throw error
            }
        }
        preconditionFailure("unreachable: the last segment returns")
    }

    /// Completes or abandons a reset that a crash interrupted. A `.reset` file is renamed into
    /// place only after every old segment is gone, so a complete one (valid header, synced
    /// before any removal) wins; a damaged one was still being written, and the old log stands.
    private static func finishReset(_ resets: [String], logs: [(firstLSN: LSN, path: String)],
                                    directory: String, directoryFD: Int32) throws -> [(firstLSN: LSN, path: String)] {
        guard resets.count == 1, let resetPath = resets.first else {
            throw LogError(.corrupt, "\(resets.count) interrupted resets found; at most one can exist", path: directory)
        }
        let fd = try POSIX.open(resetPath, flags: O_RDONLY)
        let bytes: [UInt8]
        do {
            bytes = try POSIX.pread(fd, count: SegmentHeader.byteCount + 1, offset: 0, path: resetPath)
            POSIX.close(fd)
        } catch {
            POSIX.close(fd)
            throw error
        }
        guard bytes.count == SegmentHeader.byteCount, case .success(let header) = SegmentHeader.decode(bytes) else {
            try POSIX.unlink(resetPath)
            try POSIX.fsync(directoryFD, path: directory)
            return logs
        }
        for log in logs { try POSIX.unlink(log.path) }
        try POSIX.fsync(directoryFD, path: directory)
        let firstLSN = header.base.lsn + 1
        let finalPath = join(directory, SegmentName.log(firstLSN: firstLSN))
        try POSIX.rename(resetPath, to: finalPath)
        try POSIX.fsync(directoryFD, path: directory)
        return [(firstLSN, finalPath)]
    }

    // MARK: Scanning one segment

    struct ScannedSegment {
        var segment: Segment
        var tornTailBytes: Int
    }

    /// Reads a whole segment, checking its header, every frame and lsn continuity, and cuts a
    /// torn tail off the last segment.
    static func scanSegment(fd: Int32, path: String, namedFirstLSN: LSN, previous: LogPosition?,
                            isLast: Bool, options: Options) throws -> ScannedSegment {
        func corrupt(_ reason: String, at offset: Int) -> LogError {
            LogError(.corrupt, reason, path: path, offset: offset)
        }
        let fileSize = try POSIX.fileSize(fd, path: path)
        // Segments appear only by rename once complete, so a bad header is damage, not a torn write.
        let header: SegmentHeader
        switch SegmentHeader.decode(try POSIX.pread(fd, count: SegmentHeader.byteCount, offset: 0, path: path)) {
        case .failure(let error): throw corrupt(error.description, at: 0)
        case .success(let decoded): header = decoded
        }
        guard header.base.lsn + 1 == namedFirstLSN else {
            throw corrupt("segment is named for lsn \(namedFirstLSN) but its base is lsn \(header.base.lsn)", at: 0)
        }
        if let previous, header.base != previous {
            throw corrupt("segment base \(header.base) does not continue the previous segment, which ends at \(previous)", at: 0)
        }

        var segment = Segment(path: path, base: header.base)
        var offset = SegmentHeader.byteCount
        while offset < fileSize {
            switch try readFrame(fd: fd, path: path, at: offset, fileSize: fileSize, recordBytesMax: options.recordBytesMax) {
            case .valid(let record, let frameBytes):
                // A frame that passes its CRC yet breaks the sequence is not a torn write.
                let last = segment.last
                guard record.lsn == last.lsn + 1 else {
                    throw corrupt("record has lsn \(record.lsn) where lsn \(last.lsn + 1) was expected", at: offset)
                }
                guard record.epoch >= last.epoch else {
                    throw corrupt("record lsn \(record.lsn) has epoch \(record.epoch), older than the previous record's \(last.epoch)", at: offset)
                }
                segment.append(frameAt: offset, bytes: frameBytes, position: LogPosition(record))
                offset += frameBytes
            case .invalid(let reason):
                guard isLast else {
                    throw corrupt("bad record (\(reason)) in a segment that is not the last", at: offset)
                }
                if let next = try findValidFrame(fd: fd, path: path, after: offset, fileSize: fileSize,
                                                 following: segment.last, recordBytesMax: options.recordBytesMax) {
                    throw corrupt("bad record (\(reason)) followed by a valid record at byte \(next)", at: offset)
                }
                // A torn tail: an append that never completed (or was never synced). Cut it so
                // the next append lands right after the last whole record. (After a crash this
                // includes the zeros written ahead of the appends, see `preallocate`.)
                try POSIX.ftruncate(fd, size: offset, path: path)
                try POSIX.fsync(fd, path: path)
                return ScannedSegment(segment: segment, tornTailBytes: fileSize - offset)
            }
        }
        return ScannedSegment(segment: segment, tornTailBytes: 0)
    }

    enum FrameRead {
        case valid(Record, frameBytes: Int)
        case invalid(String)
    }

    /// Reads the frame at `offset`, not trusting its length field beyond the limits and the file.
    static func readFrame(fd: Int32, path: String, at offset: Int, fileSize: Int, recordBytesMax: Int) throws -> FrameRead {
        let available = fileSize - offset
        guard available >= Frame.headerBytes else { return .invalid("partial frame header (\(available) bytes)") }
        var header = ByteReader(try POSIX.pread(fd, count: Frame.headerBytes, offset: offset, path: path))
        guard header.remaining == Frame.headerBytes else { return .invalid("partial frame header") }
        let length = Int(try header.read(UInt32.self))
        let crc = try header.read(UInt32.self)
        if let reason = Frame.checkLength(length, available: available - Frame.headerBytes, recordBytesMax: recordBytesMax) {
            return .invalid(reason)
        }
        let payload = try POSIX.pread(fd, count: length, offset: offset + Frame.headerBytes, path: path)
        guard payload.count == length else { return .invalid("partial frame: file shrank while reading") }
        switch Frame.check(payload: payload, crc: crc) {
        case .valid(let record): return .valid(record, frameBytes: Frame.headerBytes + length)
        case .invalid(let reason): return .invalid(reason)
        }
    }

    /// Looks for any intact record after a bad frame at `badOffset`: if there is one, the bad
    /// frame is damage in the middle of the log, not a torn tail.
    ///
    /// Every byte offset is a candidate, since the bad frame's length field cannot be trusted.
    /// Cheap filters (plausible length, an lsn just after `following`) keep the CRC checks
    /// rare, and the tail is read in bounded chunks.
    static func findValidFrame(fd: Int32, path: String, after badOffset: Int, fileSize: Int,
                               following last: LogPosition, recordBytesMax: Int) throws -> Int? {
        let frameBytesMin = Frame.headerBytes + Frame.payloadBytesMin
        // Bytes needed to filter a candidate: frame header, then the record's epoch and lsn.
        let peekBytes = Frame.headerBytes + 16
        let chunkBytes = 1 << 20
        // No valid record after the bad frame can have an lsn further ahead than this.
        let lsnAheadMax = LSN((fileSize - badOffset) / frameBytesMin + 1)
        let candidateLast = fileSize - frameBytesMin
        var chunkStart = badOffset + 1
        while chunkStart <= candidateLast {
            let chunk = try POSIX.pread(fd, count: min(chunkBytes + peekBytes, fileSize - chunkStart), offset: chunkStart, path: path)
            guard chunk.count >= peekBytes else { return nil }
            let candidateEnd = min(chunkStart + chunkBytes, candidateLast + 1, chunkStart + chunk.count - peekBytes + 1)
            for candidate in chunkStart..<candidateEnd {
                let i = candidate - chunkStart
                let length = Int(bigEndian32(chunk, i))
                guard length >= Frame.payloadBytesMin, length <= recordBytesMax,
                      length <= fileSize - candidate - Frame.headerBytes else { continue }
                let lsn = bigEndian64(chunk, i + Frame.headerBytes + 8)
                guard lsn > last.lsn, lsn - last.lsn <= lsnAheadMax else { continue }
                if case .valid = try readFrame(fd: fd, path: path, at: candidate, fileSize: fileSize, recordBytesMax: recordBytesMax) {
                    return candidate
                }
            }
            chunkStart += chunkBytes
        }
        return nil
    }

    private static func bigEndian32(_ b: [UInt8], _ i: Int) -> UInt32 {
        UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }

    private static func bigEndian64(_ b: [UInt8], _ i: Int) -> UInt64 {
        UInt64(bigEndian32(b, i)) << 32 | UInt64(bigEndian32(b, i + 4))
    }
}
