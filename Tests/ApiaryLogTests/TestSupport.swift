import ApiaryCore
@testable import ApiaryLog
import Foundation
import XCTest

/// A fresh directory under the system temp directory, removed when the test ends.
func makeTemporaryDirectory(_ test: XCTestCase, file: StaticString = #filePath, line: UInt = #line) throws -> String {
    let path = FileManager.default.temporaryDirectory
        .appendingPathComponent("apiary-log-tests-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
    return path
}

/// A deterministic record: `pageCount` pages of `pageBytes` bytes derived from the lsn.
func makeRecord(lsn: LSN, epoch: UInt64 = 1, pageCount: Int = 2, pageBytes: Int = 100) -> Record {
    var pages: [Page] = []
    for i in 0..<pageCount {
        let seed: Int = Int(truncatingIfNeeded: lsn) &* 31 &+ i &* 7
        let bytes: [UInt8] = (0..<pageBytes).map { (j: Int) -> UInt8 in UInt8(truncatingIfNeeded: seed &+ j) }
        pages.append(Page(number: UInt32(i + 1), bytes: bytes))
    }
    return Record(epoch: Epoch(epoch), lsn: lsn, dbSizePages: UInt32(pageCount),
                  checksum: lsn &* 0x9E37_79B9_7F4A_7C15, pages: pages)
}

/// Size of `makeRecord`'s frame on disk.
func frameBytes(pageCount: Int = 2, pageBytes: Int = 100) -> Int {
    Frame.headerBytes + Frame.payloadBytes(of: makeRecord(lsn: 1, pageCount: pageCount, pageBytes: pageBytes))
}

/// Appends records `lsns` made by `makeRecord` and syncs.
func appendRecords(_ log: ReplicationLog, _ lsns: ClosedRange<LSN>, epoch: UInt64 = 1,
                   pageCount: Int = 2, pageBytes: Int = 100) throws {
    for lsn in lsns { try log.append(makeRecord(lsn: lsn, epoch: epoch, pageCount: pageCount, pageBytes: pageBytes)) }
    try log.sync()
}

/// The log's segment file names, sorted.
func segmentFiles(_ directory: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".log") }.sorted()
}

func fileSize(_ path: String) throws -> Int {
    (try FileManager.default.attributesOfItem(atPath: path)[.size] as! NSNumber).intValue
}

/// Asserts that the file holds only zeros (space written ahead of the appends) from `offset` on.
func assertZerosOnly(_ path: String, from offset: Int, _ message: String = "", file: StaticString = #filePath, line: UInt = #line) throws {
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    XCTAssertGreaterThanOrEqual(bytes.count, offset, "file shorter than the log's end " + message, file: file, line: line)
    XCTAssertTrue(bytes.dropFirst(offset).allSatisfy { $0 == 0 }, "bytes after the log's last frame " + message, file: file, line: line)
}

func truncateFile(_ path: String, to size: Int) throws {
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.truncate(atOffset: UInt64(size))
}

func flipByte(_ path: String, at offset: Int) throws {
    var data = try Data(contentsOf: URL(fileURLWithPath: path))
    data[offset] ^= 0x5A
    try data.write(to: URL(fileURLWithPath: path))
}

func appendBytes(_ path: String, _ bytes: [UInt8]) throws {
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seekToEnd()
    try handle.write(contentsOf: bytes)
}

/// Asserts that `body` throws a ``LogError`` with `code`, and returns it for further checks.
@discardableResult
func assertLogError<T>(_ code: LogError.Code, file: StaticString = #filePath, line: UInt = #line,
                       _ body: () throws -> T) -> LogError? {
    do {
        _ = try body()
        XCTFail("expected LogError \(code), got success", file: file, line: line)
    } catch let error as LogError {
        XCTAssertEqual(error.code, code, "\(error)", file: file, line: line)
        return error
    } catch {
        XCTFail("expected LogError \(code), got \(error)", file: file, line: line)
    }
    return nil
}
