import XCTest
final class ApiaryCoreTestsPlaceholder: XCTestCase {}
