//! Errors as one line for people: the chain of causes joined with ": ", skipping a cause whose
//! text the message already holds (library errors often print their source in their own
//! message too, and `{:#}` would then say it twice).

pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::one_line;
    use anyhow::Context;

    #[test]
    fn causes_are_joined_once() {
        let io = std::io::Error::other("File too large");
        let e = Err::<(), _>(io)
            .context("size image /x: File too large")
            .context("creating disk 0 of web")
            .unwrap_err();
        assert_eq!(
            one_line(&e),
            "creating disk 0 of web: size image /x: File too large"
        );
        let e = anyhow::anyhow!("a\nb").context("outer");
        assert_eq!(one_line(&e), "outer: a b");
    }
}
