/// The software's version: `apiary --version`, and in every HTTP answer of a node or a gateway
/// (`X-RQLITE-VERSION`, where rqlite puts its own build's version), `/status` and `/nodes`.
public enum ApiaryVersion {
    public static let current = "0.1.0"
    /// What `X-RQLITE-VERSION`, `/status`'s `build.version` and `/nodes`' `version` say: Apiary
    /// is not an rqlite build, and says so.
    public static let rqliteHeaderValue = "apiary-\(current)"
    public static let rqliteHeader = "X-RQLITE-VERSION"
}
