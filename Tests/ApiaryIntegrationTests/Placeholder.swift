import XCTest
final class ApiaryIntegrationTestsPlaceholder: XCTestCase {}
