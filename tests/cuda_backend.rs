//! Opening the CUDA backend: a clear error on a machine without a driver, never a crash.
//! (On a GPU machine the test checks that it opens and reports a fingerprint instead.)

use paritybench::engine::backend::{self, Device};

#[test]
fn cuda_opens_or_says_clearly_why_not() {
    match backend::open(Device::Cuda(0), None) {
        Ok(b) => {
            assert_eq!(b.name(), "cuda");
            assert_eq!(b.device(), "cuda:0");
            let details: std::collections::BTreeMap<_, _> = b.details().into_iter().collect();
            assert!(details["device_key"].starts_with("cuda|"), "{details:?}");
            assert!(b.driver().is_some());
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("cuda:0") && e.contains("CUDA is not available"), "{e}");
            assert!(e.contains("lib"), "the message names the missing library: {e}");
        }
    }
    // an ordinal far past any machine's GPU count is an error too, never a panic
    let e = backend::open(Device::Cuda(999), None).err().expect("no machine has 1000 GPUs").to_string();
    assert!(e.contains("cuda:999") || e.contains("CUDA"), "{e}");
}
