// libsodium (WebAssembly), the one source of primitives, as the Python client's PyNaCl is.
import sodium from "../vendor/libsodium-wrappers.mjs";

await sodium.ready;

export default sodium;
