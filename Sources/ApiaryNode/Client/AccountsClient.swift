import ApiaryTLS
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// Tenants and users through a node's admin API, as a cluster operator (its certificate):
/// for `apiary ctl tenant|user`, `apiary up`, the benchmark and tests.
public struct AccountsClient {
    let credentials: ClusterCredentials
    let host: String
    let port: Int

    public init(certificatesDirectory: String, operatorName: String = "operator", host: String, port: Int) throws {
        credentials = try ClusterCredentials(directory: certificatesDirectory, name: operatorName)
        self.host = host
        self.port = port
    }

    /// One request with the operator's certificate; the answer as it came.
    public func request(_ method: HTTPMethod, _ path: String, json: [String: String]? = nil) async throws -> HTTPSConnection.Response {
        try await request(method, path, jsonObject: json)
    }

    /// The same with any JSON object as the body.
    public func request(_ method: HTTPMethod, _ path: String, jsonObject json: [String: Any]?) async throws -> HTTPSConnection.Response {
        let connection = try await HTTPSConnection.connect(host: host, port: port, tls: credentials.clusterClient(),
                                                           group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await connection.close() } }
        let body = try json.map { Array(try JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys])) }
        return try await connection.request(method, path, headers: body == nil ? [] : [("Content-Type", "application/json")], body: body)
    }

    /// Creates `tenant`; an existing one is fine.
    public func createTenant(_ tenant: String) async throws {
        let response = try await request(.POST, "/admin/tenants", json: ["name": tenant])
        guard response.status == 201 || response.status == 200 else { throw NodeError("cannot create tenant \(tenant): \(response.status) \(response.text)") }
    }

    public func createUser(_ name: String, tenant: String, role: String, password: String) async throws {
        let response = try await request(.POST, "/admin/tenants/\(tenant)/users", json: ["name": name, "role": role, "password": password])
        guard response.status == 201 else { throw NodeError("cannot create user \(name): \(response.status) \(response.text)") }
    }

    /// A bearer token for `user` (shown once): the token and its id.
    public func createToken(user: String, tenant: String, ttlSeconds: Int? = nil) async throws -> (token: String, id: String) {
        let response = try await request(.POST, "/admin/tenants/\(tenant)/users/\(user)/tokens", jsonObject: ttlSeconds.map { ["ttl_seconds": $0] } ?? [:])
        guard response.status == 201, let object = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any],
              let token = object["token"] as? String, let id = object["id"] as? String else {
            throw NodeError("cannot create a token for \(user): \(response.status) \(response.text)")
        }
        return (token, id)
    }

    /// A random password of 24 URL-safe characters.
    public static func randomPassword() -> String {
        let alphabet = Array("abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")
        var rng = SystemRandomNumberGenerator()
        return String((0..<24).map { _ in alphabet[Int.random(in: 0..<alphabet.count, using: &rng)] })
    }

    /// The value of an `Authorization` header for HTTP basic auth.
    public static func basicAuthorization(user: String, password: String) -> String {
        "Basic " + Data("\(user):\(password)".utf8).base64EncodedString()
    }
}
